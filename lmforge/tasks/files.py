"""The user's own labelled data: one .jsonl/.csv/.tsv file (split 80/10/10, seeded, stratified) or a
folder of train / validation (or dev) / test files (used as given).

Columns: `text`, optional `text_pair`, `label`. A .csv/.tsv has a header row and the usual CSV quoting
(as pandas and spreadsheets write it); a .jsonl has one object a line.

Labels: a `labels.txt` beside the data (one class name a line) fixes the classes and their ids.
Without one, names are numbered in sorted order; whole numbers are class names too ("0", "1": ids in numeric
order), and labels with a fractional part mean regression (float scores). With one,
names must be in it, and integer labels are class ids into it (or, where labels.txt itself lists
integers, e.g. star ratings 1-5, they are matched to those names).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.tasks.core import Example, Part, Source

SUFFIXES = (".jsonl", ".csv", ".tsv")
SPLIT_FILES = {"train": ("train",), "validation": ("validation", "dev"), "test": ("test",)}


@dataclass
class Row:
    where: str  # "data.csv line 7", for messages
    text: str
    text_pair: str | None
    label: object  # as read: str, int, float or bool


def read_text(path: Path) -> tuple[str, bytes]:
    """(text, raw bytes) of a UTF-8 file (a BOM is dropped); a one-line UserError if it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig"), data
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _present(v) -> bool:
    return v is not None and not (isinstance(v, str) and v.strip() == "")


def read_rows(path: Path) -> list[Row]:
    """The rows of one .jsonl/.csv/.tsv file; errors name the file and line."""
    text, _ = read_text(path)
    rows: list[Row] = []
    if path.suffix.lower() == ".jsonl":
        records, has_label, has_text = [], False, False
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path} line {i + 1} is not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {i + 1} is not a JSON object")
            has_label |= "label" in obj
            has_text |= "text" in obj
            records.append((f"{path.name} line {i + 1}", obj))
        columns = "label" if records and not has_label else "text" if records and not has_text else None
        if columns:
            raise UserError(f"{path} has no '{columns}' field in any row (each line needs text and label)")
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long document is one field
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        try:
            table = list(reader)
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num} is not valid {path.suffix[1:].upper()}: {e}") from None
        if not table:
            raise UserError(f"{path} is empty (a header row with text and label is needed)")
        header = [h.strip() for h in table[0]]
        for need in ("text", "label"):
            if need not in header:
                raise UserError(f"{path} has no '{need}' column (its header: {', '.join(header) or 'empty'})")
        records = []
        for n, values in enumerate(table[1:], start=2):
            if not values or values == [""]:
                continue
            if len(values) != len(header):
                raise UserError(f"{path} row {n} has {len(values)} fields, its header has {len(header)}")
            records.append((f"{path.name} row {n}", dict(zip(header, values))))
    for where, r in records:
        if "label" not in r or not _present(r["label"]):
            raise UserError(f"{where} has no label")
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise UserError(f"{where} has no text (a non-empty string is needed)")
        pair = r.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise UserError(f"{where}: text_pair must be a string")
        rows.append(Row(where, r["text"], pair if _present(pair) else None, r["label"]))
    return rows


# ---- labels ----------------------------------------------------------------------------------------
def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _name(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def read_labels_txt(path: Path) -> tuple[str, ...]:
    text, _ = read_text(path)
    names = tuple(line.strip() for line in text.split("\n") if line.strip())
    if not names:
        raise UserError(f"{path} names no labels (one class name a line)")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UserError(f"{path} lists {dups[0]!r} twice")
    return names


def resolve_labels(rows: list[Row], labels_txt: Path | None) -> tuple[str, tuple[str, ...], list]:
    """(kind, class names, label of each row as an id or a float)."""
    numbers = [_number(r.label) for r in rows]
    all_numbers = bool(rows) and all(x is not None for x in numbers)
    if labels_txt is None:
        if all_numbers and not all(x.is_integer() for x in numbers):
            return "regression", (), numbers
        if all_numbers:  # whole numbers are classes (0/1, star ratings), numbered in numeric order
            values = sorted({int(x) for x in numbers})
            index = {v: i for i, v in enumerate(values)}
            return "classification", tuple(str(v) for v in values), [index[int(x)] for x in numbers]
        names = tuple(sorted({_name(r.label) for r in rows}))
        index = {n: i for i, n in enumerate(names)}
        return "classification", names, [index[_name(r.label)] for r in rows]
    declared = read_labels_txt(labels_txt)
    declared_are_integers = all(_number(n) is not None and _number(n).is_integer() for n in declared)
    if all_numbers and all(x.is_integer() for x in numbers) and not declared_are_integers:
        for r, x in zip(rows, numbers):
            if not 0 <= x < len(declared):
                raise UserError(
                    f"{r.where}: label {_name(r.label)} is not a class id 0..{len(declared) - 1} "
                    f"of {labels_txt} ({len(declared)} classes)"
                )
        return "classification", declared, [int(x) for x in numbers]
    index = {n: i for i, n in enumerate(declared)}
    if declared_are_integers:  # "5" and "5.0" both name the class "5"
        index |= {_name(float(n)): i for i, n in enumerate(declared)}
    ids = []
    for r in rows:
        name = _name(_number(r.label)) if declared_are_integers and _number(r.label) is not None else _name(r.label)
        if name not in index:
            shown = ", ".join(declared[:10]) + (", ..." if len(declared) > 10 else "")
            raise UserError(f"{r.where}: label {name!r} is not in {labels_txt} ({shown})")
        ids.append(index[name])
    return "classification", declared, ids


# ---- files and folders -----------------------------------------------------------------------------
def _check_pair(groups: list[tuple[str, list[Row]]]) -> bool:
    rows = [r for _, rs in groups for r in rs]
    with_pair = [r for r in rows if r.text_pair is not None]
    if with_pair and len(with_pair) != len(rows):
        missing = next(r for r in rows if r.text_pair is None)
        raise UserError(
            f"{missing.where} has no text_pair but {len(with_pair)} other rows do: a pair task "
            f"needs text_pair on every row"
        )
    return bool(with_pair)


def _source(files: list[Path], labels_txt: Path | None) -> dict:
    hashes = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    if labels_txt is not None:
        hashes[labels_txt.name] = hashlib.sha256(labels_txt.read_bytes()).hexdigest()
    return {"kind": "files", "path": str(files[0].parent.resolve()), "files": hashes}


def _build(name: str, groups: list[tuple[str, str, Path, list[Row]]], labels_txt: Path | None) -> Source:
    """groups: (split, origin, file, rows)."""
    pair = _check_pair([(g[1], g[3]) for g in groups])
    all_rows = [r for g in groups for r in g[3]]
    kind, names, labels = resolve_labels(all_rows, labels_txt)
    parts, k = [], 0
    for split, origin, _, rows in groups:
        parts.append(Part(split, [Example(r.text, r.text_pair, labels[k + i]) for i, r in enumerate(rows)], origin))
        k += len(rows)
    metric = "pearson" if kind == "regression" else "accuracy"
    notes = []
    if labels_txt is None and kind == "classification" and all(_number(r.label) is not None for r in all_rows):
        notes.append("the labels are whole numbers and no labels.txt names classes: read as classes in numeric order")
    return Source(name, kind, names, pair, metric, parts, _source([g[2] for g in groups], labels_txt), notes=notes)


def load_file(path: Path) -> Source:
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{path}: task data must be a .jsonl, .csv or .tsv file, or a folder of them")
    rows = read_rows(path)
    if not rows:
        raise UserError(f"{path} holds no examples")
    labels_txt = path.parent / "labels.txt"
    return _build(path.stem, [("all", path.name, path, rows)], labels_txt if labels_txt.is_file() else None)


def split_files(folder: Path) -> dict[str, Path] | None:
    """{split: file} when the folder holds train/validation(or dev)/test files; None when it holds none;
    a UserError naming what is missing or ambiguous otherwise."""
    found: dict[str, list[Path]] = {}
    for split, stems in SPLIT_FILES.items():
        found[split] = [folder / f"{s}{x}" for s in stems for x in SUFFIXES if (folder / f"{s}{x}").is_file()]
    if not any(found.values()):
        return None
    out = {}
    for split, paths in found.items():
        if not paths:
            names = " or ".join(f"{s}.jsonl/.csv/.tsv" for s in SPLIT_FILES[split])
            raise UserError(f"{folder} has no {split} file ({names})")
        if len(paths) > 1:
            raise UserError(f"{folder} has {len(paths)} {split} files ({', '.join(p.name for p in paths)}): keep one")
        out[split] = paths[0]
    return out


def load_folder(folder: Path, files: dict[str, Path]) -> Source:
    groups = []
    for split, path in files.items():
        rows = read_rows(path)
        if not rows:
            raise UserError(f"{path} holds no examples (the {split} split would be empty)")
        groups.append((split, path.name, path, rows))
    labels_txt = folder / "labels.txt"
    return _build(folder.name, groups, labels_txt if labels_txt.is_file() else None)
