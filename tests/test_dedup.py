"""Near-duplicate detection (MinHash + LSH + exact containment), n-gram leakage, stratified splits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmforge.data import dedup
from lmforge.data.tokens import split_documents
from lmforge.errors import UserError

VOCAB = [f"w{i}" for i in range(5000)]


def _text(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [VOCAB[i] for i in rng.integers(0, len(VOCAB), size=n)]


def test_minhash_finds_a_planted_near_duplicate_and_keeps_an_unrelated_document():
    original = _text(0, 300)
    edited = list(original)
    for k in (10, 100, 200, 290):  # four words changed
        edited[k] = "changed"
    unrelated = _text(1, 300)
    texts = [" ".join(original), " ".join(unrelated), "Short text.", " ".join(edited)]
    found = dedup.find_near_duplicates(texts)
    assert found.dropped == {3: 0}  # the later copy goes, the first is kept
    assert found.candidate_pairs == found.verified_pairs == 1
    # The first in corpus order is the one kept, whichever it is.
    assert dedup.find_near_duplicates([texts[3], texts[1], texts[0]]).dropped == {2: 0}
    # Case and punctuation do not hide a copy.
    assert dedup.find_near_duplicates([texts[0], texts[0].upper().replace(" ", ", ")]).dropped == {1: 0}


def test_containment_verification_rejects_a_false_candidate():
    words = _text(2, 400)
    a, b = " ".join(words[:300]), " ".join(words[100:400])  # 200 of 300 words shared: containment ~0.66
    sets = dedup.shingle_sets([a, b])
    assert 0.6 < dedup.containment(*sets) < 0.8
    # With LSH tuned to flag pairs from Jaccard ~0.1 up, the pair is a candidate, and verification rejects it.
    loose = dedup.find_near_duplicates([a, b], lsh_threshold=0.1)
    assert loose.candidate_pairs == 1 and loose.verified_pairs == 0 and loose.dropped == {}
    assert dedup.find_near_duplicates([a, b], lsh_threshold=0.1, threshold=0.6).dropped == {1: 0}
    # Containment is over the smaller set: a document wholly inside a longer one is contained in it.
    short, long_ = dedup.shingle_sets([" ".join(words[50:150]), " ".join(words)])
    assert dedup.containment(short, long_) == dedup.containment(long_, short) == 1.0
    assert dedup.containment(short, np.zeros(0, dtype=np.uint64)) == 0.0


def test_only_kept_documents_make_later_ones_duplicates():
    words = _text(3, 400)
    a, b, c = (" ".join(words[i : i + 300]) for i in (0, 40, 80))  # a~b and b~c (0.86), a vs c 0.73
    sa, sb, sc = dedup.shingle_sets([a, b, c])
    assert dedup.containment(sa, sb) >= 0.8 and dedup.containment(sb, sc) >= 0.8 > dedup.containment(sa, sc)
    found = dedup.find_near_duplicates([a, b, c], lsh_threshold=0.1)
    assert found.dropped == {1: 0} and found.verified_pairs == 2  # c repeats only b, which is gone


def test_documents_shorter_than_a_shingle_are_never_near_duplicates():
    texts = ["one two three four", "one two three four", "one two", ""]
    assert [s.size for s in dedup.shingle_sets(texts)] == [0, 0, 0, 0]
    found = dedup.find_near_duplicates(texts)
    assert found.dropped == {} and found.candidate_pairs == 0


def test_minhash_is_the_stated_formula_and_lsh_starts_near_half():
    sets = dedup.shingle_sets([" ".join(_text(4, 50)), " ".join(_text(5, 700))])
    sig = dedup.minhash_signatures(sets)
    p = dedup.MERSENNE
    rng = np.random.default_rng(dedup.MINHASH_SEED)
    a = rng.integers(1, p, size=dedup.NUM_PERM, dtype=np.uint64).tolist()
    b = rng.integers(0, p, size=dedup.NUM_PERM, dtype=np.uint64).tolist()
    for doc, s in enumerate(sets):
        x = [int(v) % p for v in s]
        assert sig[doc].tolist() == [min((a[k] * xi + b[k]) % p for xi in x) for k in range(dedup.NUM_PERM)]
    bands, rows = dedup.lsh_params(128, 0.5)
    assert (bands, rows) == (25, 5) and abs((1 / bands) ** (1 / rows) - 0.5) < 0.03


_SIGNATURE_SCRIPT = """
import hashlib, sys
from lmforge.data import dedup
texts = [" ".join(f"w{(i * 7 + j) % 997}" for j in range(200)) for i in range(20)]
sig = dedup.minhash_signatures(dedup.shingle_sets(texts))
print(hashlib.sha256(sig.tobytes()).hexdigest(), sorted(dedup.find_near_duplicates(texts).dropped.items()))
"""


def test_dedup_is_deterministic_across_calls_and_processes():
    texts = [" ".join(_text(s, 200)) for s in range(20)]
    texts += [t.replace("w1", "x", 1) for t in texts[:5]]
    one, two = dedup.find_near_duplicates(texts), dedup.find_near_duplicates(texts)
    assert one == two and one.dropped == {20 + i: i for i in range(5)}
    sets = dedup.shingle_sets(texts)
    assert np.array_equal(dedup.minhash_signatures(sets), dedup.minhash_signatures(dedup.shingle_sets(texts)))
    # Python's str hash is salted per process; the ids and signatures must not depend on it.
    outs = {
        subprocess.run(
            [sys.executable, "-c", _SIGNATURE_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1


def test_leakage_is_the_share_of_32_word_windows_found_in_train():
    train = [" ".join(_text(6, 200)), " ".join(_text(7, 100))]
    assert dedup.ngram_leakage(train, train) == 1.0
    assert dedup.ngram_leakage([" ".join(_text(8, 300))], train) == 0.0
    # Half of a document copied from train: its 32-grams inside the copied part are in train.
    words = _text(6, 200)[:100] + _text(9, 100)
    assert dedup.ngram_leakage([" ".join(words)], train) == pytest.approx((100 - 31) / (200 - 31))
    assert dedup.ngram_leakage(["too short to have a 32-word window"], train) == 0.0
    assert dedup.ngram_leakage([], train) == 0.0 and dedup.ngram_leakage(train, []) == 0.0


def test_split_is_stratified_by_source_disjoint_and_complete():
    sources = [0] * 40 + [1] * 2 + [2] * 10 + [3] * 3 + [4] * 1 + [0] * 6  # a source need not be contiguous
    parts = split_documents(sources, 0.1, 0.05, seed=0)
    every = parts["train"] + parts["val"] + parts["test"]
    assert sorted(every) == list(range(len(sources)))  # disjoint and covering
    owner = np.array(sources)
    count = {split: np.bincount(owner[parts[split]], minlength=5).tolist() for split in parts}
    # val round(0.1 n) and test round(0.05 n), at least 1 each from a source of >= 3; sources 1 and 4 (2 + 1
    # documents) are pooled into one stratum of 3, which gives val and test one document each too.
    pooled = {split: c[1] + c[4] for split, c in count.items()}
    assert {split: [c[0], c[2], c[3]] for split, c in count.items()} == {
        "train": [39, 8, 1],
        "val": [5, 1, 1],
        "test": [2, 1, 1],
    }
    assert pooled == {"train": 1, "val": 1, "test": 1}
    # A pool of fewer than 3 documents trains whole.
    alone = split_documents([0] * 20 + [1], 0.1, 0.1, seed=0)
    assert 20 in alone["train"]
    assert split_documents(sources, 0.1, 0.05, seed=0) == parts
    other = split_documents(sources, 0.1, 0.05, seed=1)
    assert other != parts and {k: sorted(v) for k, v in other.items()} != {k: sorted(v) for k, v in parts.items()}
    # Large fractions still leave every source of >= 3 documents one document to train on.
    big = split_documents([0, 0, 0], 0.5, 0.45, seed=0)
    assert [len(big[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    nothing_held_out = split_documents([0] * 4, 0, 0, seed=0)
    assert (
        sorted(nothing_held_out["train"]) == [0, 1, 2, 3] and nothing_held_out["val"] == nothing_held_out["test"] == []
    )


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [
        (1.0, 0.05, "--val-fraction must be in"),
        (0.05, -0.01, "--test-fraction must be in"),
        (0.5, 0.5, "must be below 1"),
    ],
)
def test_split_rejects_bad_fractions(val, test, message):
    with pytest.raises(UserError, match=message):
        split_documents([0] * 10, val, test, seed=0)


def test_split_of_fewer_than_three_documents_cannot_hold_out():
    with pytest.raises(UserError, match="cannot hold out val documents: 2 document"):
        split_documents([0, 1], 0.05, 0.05, seed=0)
    assert split_documents([0, 1], 0, 0, seed=0)["val"] == []
    # Four one-document sources (four --input files) pool into one stratum that can hold out.
    pooled = split_documents([0, 1, 2, 3], 0.05, 0.05, seed=0)
    assert [len(pooled[s]) for s in ("train", "val", "test")] == [2, 1, 1]
