"""The task data types and the one pipeline every source goes through.

A source (built-in package, the user's files, a GLUE folder) yields `Part`s: either a split it already
has ("train", "validation", "test": used as given) or a pool to be split ("all": 80/10/10; "train" with
no validation beside it: 10% carved off as validation). `finish` then

1. collapses exact duplicates inside each pool (same text and text_pair after whitespace is normalised;
   copies that disagree on the label are all dropped, since no one label is right), so a text cannot
   land in two splits;
2. makes the splits disjoint: an example whose text is in a higher split (test > validation > train)
   is removed from the lower one, so test is never changed by what train holds;
3. splits pools with a seeded stratified split (by label; by score decile for regression);
4. writes each split as canonical JSONL (one `{"text","text_pair","label"}` object a line, keys in that
   order, no ASCII escaping, compact separators) and records its sha256, size and label counts in the
   manifest along with where every split came from.

The manifest: format, task, kind, labels, pair, metric, seed; source (package, version, filename,
sha256 and member hashes; or the files' sha256); split_method (one line per split: "80% of x,
stratified by label, seed 0" or "dev.tsv, as given"); dropped (counts by reason: "reading" for what a
reader skipped, then per split: duplicates, conflicting_labels, in_a_higher_split); notes; splits
({examples, sha256 of the canonical JSONL, labels: count per class name, or min/max/mean of the score}).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import UserError

SPLITS = ("train", "validation", "test")
METRICS = ("accuracy", "mcc", "f1", "pearson", "spearman")
MANIFEST_FORMAT = 1  # bump when the canonical bytes or the manifest's layout change: old caches are rebuilt
VALIDATION_FRACTION = TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None  # None for single-sentence tasks
    label: int | float  # class index into TaskData.labels, or a float for regression


@dataclass(frozen=True)
class TaskData:
    name: str
    kind: str  # "classification" | "regression"
    labels: tuple[str, ...]  # class names in id order; () for regression
    pair: bool  # sentence-pair task
    metric: str  # headline metric: "accuracy" | "mcc" | "f1" | "pearson" | "spearman"
    splits: dict[str, tuple[Example, ...]]  # exactly "train", "validation", "test"
    manifest: dict = field(repr=False)  # how it was made (see `finish`)

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in self.splits:
            raise UserError(f"task {self.name} has no split {name!r} (splits: {', '.join(SPLITS)})")
        return self.splits[name]


@dataclass
class Part:
    """Examples read from a source: a given split, or a pool that `finish` splits."""

    split: str  # "train" | "validation" | "test" (given), or "all" (pool for 80/10/10)
    examples: list[Example]
    origin: str  # where it came from, for the manifest (e.g. "dev.tsv")


@dataclass
class Source:
    """Everything a reader found: the parts and what the task is."""

    name: str
    kind: str
    labels: tuple[str, ...]
    pair: bool
    metric: str
    parts: list[Part]
    source: dict  # package/version/sha256 and member hashes, or file hashes
    dropped: dict = field(default_factory=dict)  # reader-level drops (empty texts, unlabelled rows), by reason
    notes: list[str] = field(default_factory=list)


# ---- canonical bytes -------------------------------------------------------------------------------
def example_line(e: Example) -> str:
    return (
        json.dumps(
            {"text": e.text, "text_pair": e.text_pair, "label": e.label}, ensure_ascii=False, separators=(",", ":")
        )
        + "\n"
    )


def canonical_bytes(examples: Iterable[Example]) -> bytes:
    return "".join(example_line(e) for e in examples).encode("utf-8")


def parse_canonical(data: bytes, kind: str) -> tuple[Example, ...]:
    out = []
    for line in data.decode("utf-8").split("\n"):
        if line:
            row = json.loads(line)
            label = float(row["label"]) if kind == "regression" else int(row["label"])
            out.append(Example(row["text"], row["text_pair"], label))
    return tuple(out)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_key(e: Example) -> tuple[str, str | None]:
    """Identity of an example's input for de-duplication: NFC, whitespace runs collapsed, ends stripped."""

    def norm(s: str | None) -> str | None:
        return None if s is None else " ".join(unicodedata.normalize("NFC", s).split())

    return norm(e.text), norm(e.text_pair)


# ---- splitting -------------------------------------------------------------------------------------
def _strata(examples: list[Example], kind: str) -> list:
    """The stratum of each example: its label, or for regression the decile of its score's rank."""
    if kind != "regression":
        return [e.label for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (examples[i].label, i))
    strata = [0] * len(examples)
    for rank, i in enumerate(order):
        strata[i] = rank * 10 // len(examples)
    return strata


def _quota(counts: dict, available: dict, fraction: float) -> dict:
    """How many of each stratum to take: `fraction` of the total (half rounds up, at least 1), spread
    over strata by largest remainder so every stratum keeps its share."""
    n = sum(counts.values())
    total = min(max(1, math.floor(n * fraction + 0.5)), sum(available.values()))
    take = {s: min(available[s], math.floor(c * fraction)) for s, c in counts.items()}
    by_remainder = sorted(counts, key=lambda s: (-(counts[s] * fraction - math.floor(counts[s] * fraction)), s))
    while sum(take.values()) < total:
        grew = False
        for s in by_remainder:
            if sum(take.values()) < total and take[s] < available[s]:
                take[s] += 1
                grew = True
        if not grew:
            break
    return take


def carve(examples: list[Example], kind: str, fractions: dict[str, float], rng: random.Random):
    """Stratified, seeded: {name: examples} with `fractions` of the pool each, and the rest. Each piece
    is in a seeded random order (the strata are interleaved, not one block per label)."""
    strata = _strata(examples, kind)
    groups: dict = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    for s in sorted(groups):
        rng.shuffle(groups[s])
    counts = {s: len(ix) for s, ix in groups.items()}
    used = dict.fromkeys(groups, 0)
    pieces = {}
    for name, fraction in fractions.items():
        take = _quota(counts, {s: counts[s] - used[s] for s in groups}, fraction)
        chosen = []
        for s in sorted(groups):
            chosen += groups[s][used[s] : used[s] + take[s]]
            used[s] += take[s]
        pieces[name] = chosen
    rest = [i for s in sorted(groups) for i in groups[s][used[s] :]]
    out = {}
    for name, ix in [*pieces.items(), ("rest", rest)]:
        rng.shuffle(ix)
        out[name] = [examples[i] for i in ix]
    return out


# ---- the pipeline ----------------------------------------------------------------------------------
def _dedupe(examples: list[Example], kind: str) -> tuple[list[Example], int, int]:
    """(kept, duplicates dropped, conflicting dropped): one copy of each text; a text whose copies carry
    different class labels is dropped entirely (for regression the first copy's score is kept)."""
    labels: dict = {}
    for e in examples:
        labels.setdefault(text_key(e), set()).add(e.label)
    kept, seen, dups, conflicts = [], set(), 0, 0
    for e in examples:
        k = text_key(e)
        if kind != "regression" and len(labels[k]) > 1:
            conflicts += 1
        elif k in seen:
            dups += 1
        else:
            seen.add(k)
            kept.append(e)
    return kept, dups, conflicts


def _label_summary(examples: tuple[Example, ...], kind: str, labels: tuple[str, ...]) -> dict:
    if kind == "regression":
        values = [e.label for e in examples]
        return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 6)}
    c = Counter(e.label for e in examples)
    return {name: c.get(i, 0) for i, name in enumerate(labels)}


def finish(src: Source, seed: int) -> TaskData:
    """The splits and manifest of `src` (see the module docstring)."""
    rng = random.Random(seed)
    drops: dict[str, dict[str, int]] = {}
    parts = [Part(p.split, list(p.examples), p.origin) for p in src.parts]
    names = sorted(p.split for p in parts)
    if names not in (["all"], ["test", "train"], ["test", "train", "validation"]):
        raise AssertionError(f"bad parts {names}")  # a reader bug, not a user mistake
    pooled = set(names)
    # 1. pools (to be split) lose their duplicates; given splits stay as they are
    to_split = "all" if "all" in pooled else ("train" if "validation" not in pooled else None)
    for p in parts:
        if p.split == to_split:
            p.examples, dups, conflicts = _dedupe(p.examples, src.kind)
            if dups or conflicts:
                drops[p.split] = {"duplicates": dups, "conflicting_labels": conflicts}
    # 2. disjoint: what test holds leaves validation and train, what validation holds leaves train
    seen: set = set()
    for name in ("test", "validation", "train", "all"):
        for p in parts:
            if p.split == name:
                before = len(p.examples)
                p.examples = [e for e in p.examples if text_key(e) not in seen]
                if before - len(p.examples):
                    drops.setdefault(name, {})["in_a_higher_split"] = before - len(p.examples)
                seen.update(text_key(e) for e in p.examples)
    # 3. split the pool
    splits: dict[str, list[Example]] = {}
    method: dict[str, str] = {}
    by_split = {p.split: p for p in parts}
    strat = "score decile" if src.kind == "regression" else "label"
    if to_split == "all":
        pool = by_split["all"]
        got = carve(pool.examples, src.kind, {"validation": VALIDATION_FRACTION, "test": TEST_FRACTION}, rng)
        splits = {"train": got["rest"], "validation": got["validation"], "test": got["test"]}
        for s, share in (("train", 80), ("validation", 10), ("test", 10)):
            method[s] = f"{share}% of {pool.origin}, stratified by {strat}, seed {seed}"
    elif to_split == "train":
        train = by_split["train"]
        got = carve(train.examples, src.kind, {"validation": VALIDATION_FRACTION}, rng)
        splits = {"train": got["rest"], "validation": got["validation"], "test": by_split["test"].examples}
        method["train"] = f"90% of {train.origin}, stratified by {strat}, seed {seed}"
        method["validation"] = f"10% of {train.origin}, stratified by {strat}, seed {seed}"
        method["test"] = f"{by_split['test'].origin}, as given"
    else:
        splits = {s: by_split[s].examples for s in SPLITS}
        method = {s: f"{by_split[s].origin}, as given" for s in SPLITS}
    for s in SPLITS:
        if not splits[s]:
            why = "" if to_split is None else f" (too few examples to split: {sum(map(len, splits.values()))})"
            raise UserError(f"task {src.name}: the {s} split is empty{why}")
    # 4. canonical bytes, hashes, manifest
    final = {s: tuple(splits[s]) for s in SPLITS}
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": src.name,
        "kind": src.kind,
        "labels": list(src.labels),
        "pair": src.pair,
        "metric": src.metric,
        "seed": seed,
        "source": src.source,
        "split_method": method,
        "dropped": ({"reading": src.dropped} if src.dropped else {}) | drops,
        "notes": src.notes,
        "splits": {
            s: {
                "examples": len(final[s]),
                "sha256": sha256_bytes(canonical_bytes(final[s])),
                "labels": _label_summary(final[s], src.kind, src.labels),
            }
            for s in SPLITS
        },
    }
    manifest = json.loads(json.dumps(manifest))  # the same object whether built now or read from the cache
    return TaskData(src.name, src.kind, src.labels, src.pair, src.metric, final, manifest)


# ---- the built-in tasks' cache ---------------------------------------------------------------------
def write_cache(task: TaskData, folder: Path) -> None:
    """train/validation/test.jsonl and manifest.json (written last, each file by rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        tmp = folder / f".{s}.jsonl.{os.getpid()}.tmp"
        tmp.write_bytes(canonical_bytes(task.splits[s]))
        tmp.replace(folder / f"{s}.jsonl")
    tmp = folder / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(task.manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(folder / "manifest.json")


def read_cache(folder: Path) -> TaskData | None:
    """The cached task, or None when it is missing, from an older format, or does not match its hashes."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != MANIFEST_FORMAT:
            return None
        splits = {}
        for s in SPLITS:
            data = (folder / f"{s}.jsonl").read_bytes()
            if sha256_bytes(data) != manifest["splits"][s]["sha256"]:
                return None
            splits[s] = parse_canonical(data, manifest["kind"])
        return TaskData(
            manifest["task"],
            manifest["kind"],
            tuple(manifest["labels"]),
            manifest["pair"],
            manifest["metric"],
            splits,
            manifest,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
