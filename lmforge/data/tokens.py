"""Token datasets for causal-LM pre-training: build them (`lmforge data`) and sample them (training).

On disk a dataset is a folder:

    manifest.json            what is here and how it was made (validated on every load)
    tokenizer.json           the tokenizer that produced the ids (+ tokenizer_config.json naming eos)
    train.bin, val.bin,      flat token streams, uint16 (uint32 when the vocabulary needs it);
    test.bin                 or train_000.bin, train_001.bin, ... with --shard-tokens

Exact and near-duplicate documents are dropped first (lmforge.data.corpus, lmforge.data.dedup). Then
documents are split whole into train / val / test, stratified by source: within each source a seeded
permutation gives val and test their share of its documents (at least one each from a source of 3 or
more), so every sizeable source is represented in both held-out splits; a source of 1-2 documents
trains. The test split is for a final, once-only measurement: nothing that tunes reads it. Each split
is a seeded shuffle of its documents, tokenized in parallel batches, each document followed by the eos
id. The manifest records the split per source and how much of val and test is verbatim in train (the
share of their 32-word windows that occur in train). The same inputs and options give byte-identical
files.

Sampling is stateless apart from one integer: batch k is a pure function of (seed, k), so resuming
is `load_state_dict({"batches_drawn": k, ...})` and every rank can compute the same global batch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.data.packages import sha256_file
from lmforge.errors import UserError, warn
from lmforge.io.atomic import atomic_dir

MANIFEST = "manifest.json"
FORMAT = "lmforge-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")  # datasets built before the test split have only these
MIN_SOURCE_DOCUMENTS = 3  # a source with fewer documents goes wholly to train
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
ENCODE_CHUNK_CHARS = 4_000_000  # text handed to one parallel encode_batch call


def dtype_for_vocab(vocab_size: int) -> str:
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise UserError(f"vocabulary of {vocab_size} tokens does not fit in uint32 ids")


# ---- building ------------------------------------------------------------------------------------
def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for flag, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= f < 1:
            raise UserError(f"{flag} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise UserError(
            f"--val-fraction + --test-fraction must be below 1 (documents must be left to train on), "
            f"got {val_fraction} + {test_fraction}"
        )


def _held_out_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) documents of a source of n >= MIN_SOURCE_DOCUMENTS: round(fraction * n), at least 1
    for a fraction above 0, shrunk (the larger first) until at least one document is left to train."""
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
    while n_val + n_test > n - 1:
        if n_test >= n_val and n_test > (1 if test_fraction else 0):
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def split_documents(
    sources: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """{split: document indices}, whole documents stratified by source; `sources[i]` is document i's source.

    Within each source a permutation seeded by (seed, source) gives val its first round(val_fraction * n)
    documents and test the next round(test_fraction * n) (see `_held_out_counts`), the rest train. Sources of
    fewer than MIN_SOURCE_DOCUMENTS documents (e.g. one --input file each) are pooled into one stratum, split the
    same way if the pool is large enough and trained on whole otherwise. Each split is then a seeded shuffle."""
    check_fractions(val_fraction, test_fraction)
    s = seed % (1 << 64)
    owner = np.asarray(sources, dtype=np.int64)
    small = np.bincount(owner)[owner] < MIN_SOURCE_DOCUMENTS if owner.size else np.zeros(0, dtype=bool)
    strata = [(np.flatnonzero((owner == src) & ~small), [s, 0, src]) for src in np.unique(owner[~small]).tolist()]
    strata.append((np.flatnonzero(small), [s, 2, 0]))  # the pooled small sources
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for docs, rng_seed in strata:
        if docs.size < MIN_SOURCE_DOCUMENTS:
            parts["train"].append(docs)
            continue
        n_val, n_test = _held_out_counts(docs.size, val_fraction, test_fraction)
        order = docs[np.random.default_rng(rng_seed).permutation(docs.size)]
        parts["val"].append(order[:n_val])
        parts["test"].append(order[n_val : n_val + n_test])
        parts["train"].append(order[n_val + n_test :])
    out = {}
    for k, name in enumerate(SPLITS):
        idx = np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype=np.int64)
        out[name] = idx[np.random.default_rng([s, 1, k]).permutation(idx.size)].tolist()
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not out[name]:
            raise UserError(
                f"cannot hold out {name} documents: {owner.size} document(s) in all, fewer than "
                f"{MIN_SOURCE_DOCUMENTS} (pass more files, a .jsonl with one document per line, or "
                f"--val-fraction 0 --test-fraction 0)"
            )
    return out


class TokenShardWriter:
    """Appends token arrays to <split>.bin, or to <split>_000.bin, ... of `shard_tokens` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int | None):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, DTYPES[dtype], shard_tokens
        self.shards: list[dict] = []
        self._hashes: list = []

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if not self.shards or self.shards[-1]["tokens"] == self.shard_tokens:  # None: never full
                n = len(self.shards)
                name = f"{self.split}.bin" if self.shard_tokens is None else f"{self.split}_{n:03d}.bin"
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
                self._hashes.append(hashlib.sha256())
            shard = self.shards[-1]
            room = ids.size if self.shard_tokens is None else self.shard_tokens - shard["tokens"]
            data = ids[:room].astype(self.dtype).tobytes()
            with open(self.folder / shard["file"], "ab") as f:
                f.write(data)
            self._hashes[-1].update(data)
            shard["tokens"] += min(room, ids.size)
            ids = ids[room:]

    def finish(self) -> list[dict]:
        for shard, h in zip(self.shards, self._hashes):
            shard["sha256"] = h.hexdigest()
        return self.shards


def _tokenize_split(tok, texts: list[str], writer: TokenShardWriter, desc: str) -> np.ndarray:
    """Encode `texts` in parallel chunks, write each document then eos; returns each document's token
    count (eos included), int64."""
    from tqdm import tqdm

    counts, start = [], 0
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=None) as bar:
        while start < len(texts):
            end, chars = start, 0
            while end < len(texts) and (end == start or chars + len(texts[end]) <= ENCODE_CHUNK_CHARS):
                chars += len(texts[end])
                end += 1
            rows = [np.array([*ids, tok.eos_id], dtype=np.int64) for ids in tok.encode_batch(texts[start:end])]
            chunk = np.concatenate(rows)
            writer.write(chunk)
            counts.extend(r.size for r in rows)
            bar.update(end - start)
            start = end
    return np.array(counts, dtype=np.int64)


def _source_name(record: dict) -> str:
    return record.get("package") or record.get("path") or record.get("kind", "?")


def build_dataset(
    out: str | Path,
    starter: bool = False,
    inputs: Sequence[str] = (),
    tokenizer: str = "bpe:8192",
    val_fraction: float = 0.05,
    seed: int = 0,
    shard_tokens: int | None = None,
    overwrite: bool = False,
    *,
    test_fraction: float = 0.05,
) -> dict:
    """Build a token dataset in `out` (atomically) and return its manifest."""
    from lmforge.data import corpus, dedup, tokenizer_build

    if shard_tokens is not None and shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    check_fractions(val_fraction, test_fraction)
    with atomic_dir(out, overwrite=overwrite) as tmp:  # refuses a non-empty `out` before any work
        sources, docs = corpus.collect_documents(starter, list(inputs))
        owner = np.repeat(np.arange(len(sources)), [r["documents"] for r in sources])  # source of each doc
        index = split_documents(owner, val_fraction, test_fraction, seed)
        texts = {split: [docs[i].text for i in index[split]] for split in SPLITS}
        tok = tokenizer_build.resolve_tokenizer(tokenizer, texts["train"])
        dtype = dtype_for_vocab(tok.vocab_size)
        for name, data in tok.files.items():
            (tmp / name).write_bytes(data)

        splits = {}
        for split in SPLITS:
            writer = TokenShardWriter(tmp, split, dtype, shard_tokens)
            counts = _tokenize_split(tok, texts[split], writer, f"tokenizing {split}")
            src = owner[index[split]]
            n_docs = np.bincount(src, minlength=len(sources))
            n_tokens = np.zeros(len(sources), dtype=np.int64)
            np.add.at(n_tokens, src, counts)
            splits[split] = {
                "documents": len(texts[split]),
                "tokens": int(counts.sum()),
                "shards": writer.finish(),
                "by_source": [
                    {"source": _source_name(r), "documents": int(d), "tokens": int(t)}
                    for r, d, t in zip(sources, n_docs, n_tokens)
                ],
            }

        train_windows = dedup.NgramIndex(texts["train"], dedup.LEAK_WORDS)
        bands, rows = dedup.lsh_params(dedup.NUM_PERM, dedup.LSH_THRESHOLD)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "eos_token": tok.eos_token,
            "layout": "each split's documents in a seeded shuffle, each followed by eos_id",
            "tokenizer": {
                "kind": tok.kind,
                "spec": tokenizer,
                "file": tok.main_file,
                "sha256": tok.sha256,
                "files": list(tok.files),
            },
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "stratified_by": "source",
            "min_source_documents": MIN_SOURCE_DOCUMENTS,
            "splits": splits,
            "dedup": {
                "exact": "sha256 of the cleaned text",
                "exact_duplicates_dropped": sum(r["duplicates_dropped"] for r in sources),
                "near": "MinHash + LSH over lower-cased word shingles, candidates verified by containment",
                "shingle_words": dedup.SHINGLE_WORDS,
                "num_perm": dedup.NUM_PERM,
                "lsh_bands": bands,
                "lsh_rows": rows,
                "containment_threshold": dedup.CONTAINMENT,
                "near_duplicates_dropped": sum(r["near_duplicates_dropped"] for r in sources),
            },
            "leakage": {
                "ngram_words": dedup.LEAK_WORDS,
                "val_32gram_in_train": round(train_windows.contained_fraction(texts["val"]), 6),
                "test_32gram_in_train": round(train_windows.contained_fraction(texts["test"]), 6),
            },
            "sources": sources,
            "built_with": {name: _version(name) for name in ("lmforge", "tokenizers", "tiktoken")},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- loading -------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    """The validated manifest of a dataset folder (shards are checked by TokenDataset)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a token dataset: no {MANIFEST} (build one with `lmforge data`)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"{path} is malformed: {what}")

    need(isinstance(m, dict) and m.get("format") == FORMAT, f"format is not {FORMAT!r}")
    need(m.get("version") == FORMAT_VERSION, f"version {m.get('version')!r} (this lmforge reads {FORMAT_VERSION})")
    need(m.get("dtype") in DTYPES, f"dtype {m.get('dtype')!r} is not one of {list(DTYPES)}")
    vocab, eos = m.get("vocab_size"), m.get("eos_id")
    need(isinstance(vocab, int) and vocab > 0, "vocab_size must be a positive integer")
    need(isinstance(eos, int) and 0 <= eos < vocab, f"eos_id {eos!r} is not a token id below vocab_size {vocab}")
    if vocab > np.iinfo(DTYPES[m["dtype"]]).max + 1:
        raise UserError(f"{path}: vocab_size {vocab} does not fit dtype {m['dtype']}")
    splits = m.get("splits")
    need(isinstance(splits, dict) and all(s in splits for s in REQUIRED_SPLITS), "splits train and val are required")
    for name in SPLITS:
        if name not in splits:  # test: absent from datasets built before it existed
            continue
        s = splits[name]
        need(
            isinstance(s, dict) and isinstance(s.get("tokens"), int) and isinstance(s.get("shards"), list),
            f"split {name} needs tokens and shards",
        )
        for shard in s["shards"]:
            need(
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and "/" not in shard["file"]
                and isinstance(shard.get("tokens"), int)
                and isinstance(shard.get("sha256"), str),
                f"split {name} has a bad shard entry {shard!r}",
            )
        need(sum(sh["tokens"] for sh in s["shards"]) == s["tokens"], f"split {name}: shard tokens do not sum up")
    tok = m.get("tokenizer")
    need(
        isinstance(tok, dict) and isinstance(tok.get("file"), str) and isinstance(tok.get("sha256"), str),
        "tokenizer needs file and sha256",
    )
    return m


class TokenDataset:
    """One split of a token dataset, memory-mapped; shards read as one continuous stream."""

    def __init__(self, folder: str | Path, split: str = "train", verify: bool = True):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (expected one of {SPLITS})")
        self.folder, self.split = Path(folder), split
        self.manifest = m = read_manifest(folder)
        self.dtype = DTYPES[m["dtype"]]
        self.vocab_size, self.eos_id = m["vocab_size"], m["eos_id"]
        if split not in m["splits"]:
            raise UserError(
                f"{self.folder} has no {split} split (it was built by an older lmforge): rebuild it with `lmforge data`"
            )
        info = m["splits"][split]
        self.documents, self.tokens = info.get("documents", 0), info["tokens"]
        if self.tokens == 0:
            raise UserError(f"{self.folder} has no {split} tokens (was it built with --{split}-fraction 0?)")
        self._shards: list[np.memmap] = []
        itemsize = np.dtype(self.dtype).itemsize
        for shard in info["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise UserError(f"{self.folder}: shard {shard['file']} listed in {MANIFEST} is missing")
            if path.stat().st_size != shard["tokens"] * itemsize:
                raise UserError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says "
                    f"{shard['tokens']} tokens x {itemsize} (truncated or replaced?)"
                )
            if verify and sha256_file(path) != shard["sha256"]:
                raise UserError(f"{path} does not match its sha256 in {MANIFEST} (corrupted or replaced)")
            if shard["tokens"]:
                self._shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # stream offset of each shard

    def __len__(self) -> int:
        return self.tokens

    @property
    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files stored with the dataset ({name: bytes}), checked against the manifest."""
        tok = self.manifest["tokenizer"]
        files = {}
        for name in tok.get("files", [tok["file"]]):
            path = self.folder / name
            if not path.is_file():
                raise UserError(f"{self.folder}: tokenizer file {name} listed in {MANIFEST} is missing")
            files[name] = path.read_bytes()
        if hashlib.sha256(files[tok["file"]]).hexdigest() != tok["sha256"]:
            raise UserError(f"{self.folder / tok['file']} does not match its sha256 in {MANIFEST}")
        return files

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as int64, across shard boundaries."""
        if start < 0 or start + length > self.tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a split of {self.tokens}")
        parts, pos, end = [], start, start + length
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while pos < end:
            lo = pos - self._starts[i]
            hi = min(end, self._starts[i + 1]) - self._starts[i]
            parts.append(self._shards[i][lo:hi])
            pos += hi - lo
            i += 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)

    def windows(self, starts: Sequence[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (len(starts), seq_len) int64: x = tokens from each start, y = x shifted by one."""
        rows = np.stack([self.read(int(s), seq_len + 1) for s in starts])  # (B, T + 1)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def _check_fits(self, seq_len: int) -> None:
        if seq_len <= 0:
            raise UserError(f"seq_len must be positive, got {seq_len}")
        if self.tokens < seq_len + 1:
            raise UserError(
                f"the {self.split} split of {self.folder} has {self.tokens} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}"
            )

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of `n_batches` (x, y) batches of (batch_size, seq_len): windows at evenly spaced
        offsets covering the whole split, the same on every call, rank and run."""
        self._check_fits(seq_len)
        if n_batches <= 0 or batch_size <= 0:
            raise UserError(f"need positive n_batches and batch_size, got {n_batches} and {batch_size}")
        starts = np.linspace(0, self.tokens - seq_len - 1, n_batches * batch_size).round().astype(np.int64)
        return [self.windows(starts[b * batch_size : (b + 1) * batch_size], seq_len) for b in range(n_batches)]


class BatchSampler:
    """Random (batch_size, seq_len) windows of a TokenDataset; batch k depends only on (seed, k).

    `next_batch()` gives the global batch; rank r of W trains on rows r::W (`next_batch(r, W)` reads
    only those), so any number of ranks sees exactly the rows one process would."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0):
        dataset._check_fits(seq_len)
        if batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.batches_drawn = 0

    def starts(self, index: int) -> np.ndarray:
        """(batch_size,) window offsets of global batch `index`."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed % (1 << 64), index])))
        return rng.integers(0, self.dataset.tokens - self.seq_len, size=self.batch_size)  # window T+1 fits

    def batch(self, index: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows rank::world of global batch `index`: (x, y), each (ceil((B - rank) / world), T)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        return self.dataset.windows(self.starts(index)[rank::world], self.seq_len)

    def next_batch(self, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.batches_drawn, rank, world)
        self.batches_drawn += 1
        return out

    def state_dict(self) -> dict:
        return {
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "tokens": self.dataset.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; a different seed, batch shape or dataset size is an error,
        since the same count would then mean different data."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "seq_len", "tokens"):
            if key in state and state[key] != mine[key]:
                raise UserError(
                    f"cannot resume the data position: the checkpoint's sampler has {key}="
                    f"{state[key]}, this run has {mine[key]}"
                )
        if not isinstance(state.get("batches_drawn"), int) or state["batches_drawn"] < 0:
            raise UserError(f"sampler state has no valid batches_drawn: {state.get('batches_drawn')!r}")
        self.batches_drawn = state["batches_drawn"]


def check_tokenizer_matches(
    manifest: dict, model_vocab_size: int, tokenizer_files: dict[str, bytes] | None = None
) -> None:
    """Refuse to train a model on ids it cannot embed, or on a tokenizer other than its own.

    `tokenizer_files` are the model's ({name: bytes}, e.g. from its checkpoint); None skips the
    identity check (a freshly initialised model has no tokenizer of its own)."""
    vocab = manifest["vocab_size"]
    if vocab > model_vocab_size:
        raise UserError(
            f"the dataset's vocabulary ({vocab} tokens) is larger than the model's vocab_size "
            f"({model_vocab_size}): rebuild the data with the model's tokenizer or enlarge the model"
        )
    if not tokenizer_files:  # a fresh model, sized by the recipe
        if model_vocab_size > vocab:
            warn(
                f"model.vocab_size {model_vocab_size} is larger than the dataset's vocabulary ({vocab} tokens): "
                f"{model_vocab_size - vocab} embedding rows never train, and samples can hold ids no token decodes to"
            )
        return
    tok = manifest["tokenizer"]
    theirs = tokenizer_files.get(tok["file"])
    if theirs is None or hashlib.sha256(theirs).hexdigest() != tok["sha256"]:
        raise UserError(
            f"the dataset was tokenized with a different tokenizer than the model's ({tok['file']} "
            f"sha256 {tok['sha256'][:12]}...): rebuild it with `lmforge data --tokenizer CHECKPOINT`"
        )
