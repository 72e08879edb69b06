"""A GLUE task folder as the official GLUE download lays it out (glue_data/<Task>/train.tsv, dev.tsv).

The task is named by the folder (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, MNLI-mm, QNLI, RTE, WNLI; case,
'-' and '_' ignored) or, failing that, recognised from train.tsv's header. GLUE's test files have no
labels, so GLUE's dev set is the test split and validation is 10% of train (seeded, stratified).
MNLI's test is dev_matched.tsv; MNLI-mm's is dev_mismatched.tsv (a folder named MNLI-mm, or the
path <glue>/MNLI-mm when only <glue>/MNLI exists).

The files are read as GLUE's own scripts read them: one row a line, fields split on tabs, no quoting
(sentences hold bare quote marks). Label ids follow GLUE's (and Hugging Face's) order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

from lmforge.errors import UserError
from lmforge.tasks.core import Example, Part, Source
from lmforge.tasks.files import read_text


@dataclass(frozen=True)
class GlueTask:
    title: str
    header: tuple[str, ...] | None  # columns train.tsv's header must hold; None: headerless (CoLA)
    text: str | int
    pair: str | int | None
    label: str | int
    labels: tuple[str, ...]  # class names in id order; () for regression
    values: dict[str, int] | None  # label as written -> id (None: the names themselves)
    metric: str
    dev: str = "dev.tsv"


NLI2 = ("entailment", "not_entailment")
GLUE: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", None, 3, None, 1, ("unacceptable", "acceptable"), {"0": 0, "1": 1}, "mcc"),
    "sst2": GlueTask(
        "SST-2",
        ("sentence", "label"),
        "sentence",
        None,
        "label",
        ("negative", "positive"),
        {"0": 0, "1": 1},
        "accuracy",
    ),
    "mrpc": GlueTask(
        "MRPC",
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        "#1 String",
        "#2 String",
        "Quality",
        ("not_equivalent", "equivalent"),
        {"0": 0, "1": 1},
        "f1",
    ),
    "qqp": GlueTask(
        "QQP",
        ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        "question1",
        "question2",
        "is_duplicate",
        ("not_duplicate", "duplicate"),
        {"0": 0, "1": 1},
        "f1",
    ),
    "stsb": GlueTask(
        "STS-B", ("sentence1", "sentence2", "score"), "sentence1", "sentence2", "score", (), None, "pearson"
    ),
    "mnli": GlueTask(
        "MNLI",
        ("sentence1", "sentence2", "gold_label"),
        "sentence1",
        "sentence2",
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        None,
        "accuracy",
        "dev_matched.tsv",
    ),
    "qnli": GlueTask(
        "QNLI", ("index", "question", "sentence", "label"), "question", "sentence", "label", NLI2, None, "accuracy"
    ),
    "rte": GlueTask(
        "RTE", ("index", "sentence1", "sentence2", "label"), "sentence1", "sentence2", "label", NLI2, None, "accuracy"
    ),
    "wnli": GlueTask(
        "WNLI",
        ("index", "sentence1", "sentence2", "label"),
        "sentence1",
        "sentence2",
        "label",
        ("not_entailment", "entailment"),
        {"0": 0, "1": 1},
        "accuracy",
    ),
}
GLUE["mnlimm"] = replace(GLUE["mnli"], title="MNLI-mm", dev="dev_mismatched.tsv")  # the other dev set
ALIASES = {"sst": "sst2", "sts": "stsb", "mnlim": "mnli", "mnlimatched": "mnli", "mnlimismatched": "mnlimm"}
UNLABELLED = {"-", ""}  # MNLI rows whose annotators did not agree on a gold label


def task_key(name: str) -> str | None:
    key = name.lower().replace("-", "").replace("_", "")
    key = ALIASES.get(key, key)
    return key if key in GLUE else None


def _split(text: str) -> list[tuple[int, list[str]]]:
    return [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(text.split("\n"), 1) if line.rstrip("\r")]


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    return _split(read_text(path)[0])


def head_lines(path: Path, size: int = 1 << 16) -> list[tuple[int, list[str]]]:
    """The whole lines in the first `size` bytes of a file (for recognising a layout without reading
    a 300 MB MNLI file); [] when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(size)
    except OSError:
        return []
    if len(data) == size:
        data = data[: data.rfind(b"\n") + 1] or data
    return _split(data.decode("utf-8-sig", errors="replace"))


def detect(folder: Path) -> str | None:
    """The GLUE task a folder holds, by its name or else by train.tsv's header; None if it is not GLUE."""
    key = task_key(folder.name)
    if key is not None:
        return key
    train = folder / "train.tsv"
    if not train.is_file():
        return None
    rows = head_lines(train)
    if not rows:
        return None
    first = rows[0][1]
    cols = set(first)
    if first[0] == "Quality" and "#1 String" in cols:
        return "mrpc"
    if {"qid1", "question1", "is_duplicate"} <= cols:
        return "qqp"
    if first == ["sentence", "label"]:
        return "sst2"
    if first[-1] == "score" and {"sentence1", "sentence2"} <= cols:
        return "stsb"
    if "gold_label" in cols and (folder / "dev_matched.tsv").is_file():
        return "mnli"
    if first == ["index", "question", "sentence", "label"]:
        return "qnli"
    if first == ["index", "sentence1", "sentence2", "label"]:
        values = {r[-1] for _, r in rows[1:]}
        return "wnli" if values <= {"0", "1"} else "rte" if values <= set(NLI2) else None
    if len(first) == 4 and first[1] in ("0", "1") and all(len(r) == 4 and r[1] in ("0", "1") for _, r in rows[:50]):
        return "cola"
    return None


def _read(path: Path, key: str, dropped: dict) -> list[Example]:
    task = GLUE[key]
    if not path.is_file():
        raise UserError(f"GLUE {task.title} folder {path.parent} has no {path.name}")
    rows = _lines(path)
    if task.header is None:
        if rows and rows[0][1][:2] == ["index", "sentence"]:
            raise UserError(f"{path} has a header: GLUE CoLA's {path.name} has none (that is the layout of test.tsv)")
        width = 4
        col = {"text": task.text, "pair": task.pair, "label": task.label}
    else:
        if not rows:
            raise UserError(f"{path} is empty")
        header = [h.lstrip("\ufeff") for h in rows[0][1]]
        missing = [c for c in task.header if c not in header]
        if missing:
            raise UserError(
                f"{path} is not GLUE {task.title}'s layout: its header lacks {', '.join(missing)} "
                f"(has {', '.join(header)})"
            )
        width = len(header)
        col = {
            k: header.index(v) if v is not None else None
            for k, v in (("text", task.text), ("pair", task.pair), ("label", task.label))
        }
        rows = rows[1:]
    out, malformed = [], []
    for n, fields in rows:
        if len(fields) != width:
            # GLUE's own files have a few such lines: QQP questions broken by a newline, STS-B rows with
            # stray tabs after the sentences (its score is the last field, so those rows still read).
            if key == "stsb" and len(fields) > width:
                dropped["extra_fields_kept"] = dropped.get("extra_fields_kept", 0) + 1
                last, fields = fields[-1], fields[:width]
                fields[col["label"]] = last
            else:
                malformed.append((n, len(fields)))
                continue
        raw = fields[col["label"]].strip()
        if not task.labels:
            try:
                label: int | float = float(raw)
            except ValueError:
                label = math.nan
            if not math.isfinite(label):
                raise UserError(f"{path} line {n}: score {raw!r} is not a number")
        elif task.values is not None and raw in task.values:
            label = task.values[raw]
        elif task.values is None and raw in task.labels:
            label = task.labels.index(raw)
        elif raw in UNLABELLED and task.values is None:
            dropped["unlabelled"] = dropped.get("unlabelled", 0) + 1
            continue
        else:
            allowed = ", ".join(task.values or task.labels)
            raise UserError(f"{path} line {n}: label {raw!r} is not one of GLUE {task.title}'s ({allowed})")
        text = fields[col["text"]].strip()
        pair = fields[col["pair"]].strip() if col["pair"] is not None else None
        if not text or pair == "":
            dropped["empty"] = dropped.get("empty", 0) + 1
            continue
        out.append(Example(text, pair, label))
    if malformed:
        n, got = malformed[0]
        if len(malformed) * 100 > len(rows):  # more than 1%: the wrong layout, not a stray line
            raise UserError(
                f"{path} line {n} has {got} tab-separated fields, expected {width} "
                f"({len(malformed)} of {len(rows)} lines are like it)"
            )
        dropped["malformed_lines"] = dropped.get("malformed_lines", 0) + len(malformed)
    return out


def load_glue(folder: Path, key: str) -> Source:
    task = GLUE[key]
    dropped: dict[str, int] = {}
    train_path, dev_path = folder / "train.tsv", folder / task.dev
    train = _read(train_path, key, dropped)
    test = _read(dev_path, key, dropped)
    kind = "regression" if not task.labels else "classification"
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (train_path, dev_path)}
    source = {"kind": "glue", "task": task.title, "path": str(folder.resolve()), "files": files}
    notes = [f"test = GLUE's dev set ({task.dev}): GLUE's test labels are not public; validation is 10% of train.tsv"]
    if key == "stsb":
        notes.append("headline metric pearson; report spearman beside it")
    return Source(
        task.title.lower(),
        kind,
        task.labels,
        task.pair is not None,
        task.metric,
        [Part("train", train, "train.tsv"), Part("test", test, task.dev)],
        source,
        dropped,
        notes,
    )
