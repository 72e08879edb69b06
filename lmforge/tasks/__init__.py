"""Labelled text-classification and regression tasks for fine-tuning and evaluation.

`load_task(spec, seed)` reads a built-in task (real data inside pinned PyPI archives, see TASKS), the
user's own .jsonl/.csv/.tsv file or folder of split files, or a GLUE task folder, and returns its
train / validation / test splits: disjoint, deterministic for a given input and seed, and described
by a manifest (source hashes, how each split was made, sizes, per-split sha256 of the canonical JSONL,
label counts). Every mistake in the input is a one-line `lmforge.errors.UserError`.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import UserError
from lmforge.tasks import files, glue
from lmforge.tasks.builtin import TASKS, load_builtin
from lmforge.tasks.core import Example, TaskData, finish

__all__ = ["Example", "TaskData", "TASKS", "load_task"]


def _user_layout(folder: Path) -> bool:
    """True when a folder's train file is in the user's own layout (a text and a label column)."""
    if any((folder / f"train{x}").is_file() for x in (".jsonl", ".csv")):
        return True
    head = glue.head_lines(folder / "train.tsv", 1 << 12)
    return bool(head) and "text" in head[0][1] and "label" in head[0][1]


def _source(spec: str):
    path = Path(spec).expanduser()
    if path.is_dir():
        key = glue.detect(path)
        if key is not None and not _user_layout(path):
            return glue.load_glue(path, key)
        split = files.split_files(path)
        if split is None:
            raise UserError(
                f"{path} holds no train/validation/test .jsonl, .csv or .tsv files and is not a GLUE task folder"
            )
        return files.load_folder(path, split)
    if path.is_file():
        return files.load_file(path)
    if glue.task_key(path.name) == "mnlimm":  # <glue>/MNLI-mm: MNLI's folder, scored on dev_mismatched
        for sibling in path.parent.iterdir() if path.parent.is_dir() else ():
            if sibling.is_dir() and glue.task_key(sibling.name) == "mnli":
                return glue.load_glue(sibling, "mnlimm")
    if path.exists():
        raise UserError(f"{path} is neither a file nor a folder")
    raise UserError(f"unknown task {spec!r}: not a built-in task ({', '.join(TASKS)}) and no such file or folder")


def load_task(spec: str, seed: int = 0, cache_dir: Path | None = None) -> TaskData:
    """The task named by `spec`: a built-in name (TASKS), or the path of a data file or folder.

    Built-in tasks are fetched on first use and cached as canonical JSONL + manifest.json under
    `cache_dir` (default: the package cache's sibling folder "tasks"), one folder per seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"the task seed must be an integer, not {seed!r}")
    if not str(spec).strip():
        raise UserError(f"no task given: name a built-in task ({', '.join(TASKS)}) or a data file or folder")
    if spec in TASKS:
        return load_builtin(spec, seed, cache_dir)
    return finish(_source(str(spec)), seed)
