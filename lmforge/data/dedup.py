"""Near-duplicate documents (MinHash + LSH, verified exactly) and n-gram leakage between splits.

Words are the lower-cased `\\w+` runs of a text. Each word is hashed once with blake2b (64 bits), and a
window of n consecutive words (a shingle) gets a 64-bit id from those word hashes: a polynomial in
uint64 arithmetic, then a 64-bit finalizer. Nothing uses Python's `hash()` (salted per process), so the
same texts give the same ids, signatures and decisions in every run and on every machine.

Near-duplicates: a document's shingles are its 5-word windows. 128 MinHash functions
h(x) = (a*x + b) mod (2^31 - 1), with (a, b) from a seeded numpy generator, give each document a
signature; LSH cuts it into bands of r rows (r chosen so that (1/bands)^(1/r), where candidates start,
is nearest Jaccard 0.5), and two documents whose signatures agree on a whole band are a candidate pair.
Every candidate pair is then verified exactly on the shingle sets: containment |A & B| / min(|A|, |B|)
>= 0.8. In corpus order, a document is dropped when it is a verified near-duplicate of an earlier
document that is itself kept (so the first of each group survives). Documents with fewer words than a
shingle have no shingles and are never near-duplicates (exact deduplication handles them).

Leakage: the fraction of a split's 32-word windows that occur anywhere in the train split.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SHINGLE_WORDS = 5
NUM_PERM = 128
LSH_THRESHOLD = 0.5  # Jaccard similarity near which LSH candidates start
CONTAINMENT = 0.8  # verified near-duplicate: |A & B| / min(|A|, |B|) >= this
MINHASH_SEED = 0x5EED
LEAK_WORDS = 32
MERSENNE = (1 << 31) - 1
CHUNK = 512  # shingles per vectorised MinHash step: two CHUNK x NUM_PERM uint64 buffers that stay in cache

_WORD = re.compile(r"\w+")
_MASK64 = (1 << 64) - 1
_POLY = 0x9E3779B97F4A7C15  # odd multiplier of the window polynomial


class WordHasher:
    """64-bit ids of words (blake2b of the UTF-8 word), cached, so each distinct word is hashed once."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        """(words,) uint64: the id of each lower-cased word of `text`, in order."""
        words = _WORD.findall(text.lower())
        cache = self._cache
        ids = list(map(cache.get, words))
        if None in ids:
            for k, w in enumerate(words):
                if ids[k] is None:
                    if w not in cache:
                        cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
                    ids[k] = cache[w]
        return np.array(ids, dtype=np.uint64)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every output bit depends on every input bit."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def sorted_unique(h: np.ndarray) -> np.ndarray:
    """The distinct values of `h`, ascending (a sort is faster here than np.unique's hash table)."""
    h = np.sort(h)
    return h[np.r_[True, h[1:] != h[:-1]]] if h.size else h


def window_hashes(word_ids: np.ndarray, n: int) -> np.ndarray:
    """(max(0, words - n + 1),) uint64: a 64-bit id of each window of n consecutive words."""
    m = word_ids.size - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):  # sum_j id[i + j] * POLY^(n - 1 - j), wrapping mod 2^64
        h *= np.uint64(_POLY)
        h += word_ids[j : j + m]
    h += np.uint64(n)
    return _mix64(h)


def shingle_sets(texts: Sequence[str], n: int = SHINGLE_WORDS, hasher: WordHasher | None = None) -> list[np.ndarray]:
    """Each text's set of n-word shingle ids, as a sorted unique uint64 array (empty below n words)."""
    hasher = hasher or WordHasher()
    return [sorted_unique(window_hashes(hasher(t), n)) for t in texts]


def lsh_params(num_perm: int = NUM_PERM, threshold: float = LSH_THRESHOLD) -> tuple[int, int]:
    """(bands, rows): the split of `num_perm` hashes whose S-curve midpoint (1/bands)^(1/rows) is nearest
    `threshold` (for 128 and 0.5: 25 bands of 5 rows, midpoint 0.525)."""
    best = min(range(1, num_perm + 1), key=lambda r: (abs((1 / (num_perm // r)) ** (1 / r) - threshold), r))
    return num_perm // best, best


def minhash_signatures(sets: Sequence[np.ndarray], num_perm: int = NUM_PERM, seed: int = MINHASH_SEED) -> np.ndarray:
    """(documents, num_perm) uint64 MinHash signatures: min over a document's shingles x of
    (a*x + b) mod (2^31 - 1), x being the shingle id mod 2^31 - 1. A document without shingles gets the
    out-of-range value 2^31 - 1 everywhere (callers leave it out of LSH)."""
    p = np.uint64(MERSENNE)
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE, size=num_perm, dtype=np.uint64)
    sig = np.full((len(sets), num_perm), MERSENNE, dtype=np.uint64)
    sizes = np.array([s.size for s in sets], dtype=np.int64)
    if not sizes.sum():
        return sig
    x = np.concatenate([s for s in sets if s.size]) % p
    owner = np.repeat(np.arange(len(sets)), sizes)  # document of each shingle
    buf = np.empty((CHUNK, num_perm), dtype=np.uint64)
    tmp = np.empty_like(buf)
    for lo in range(0, x.size, CHUNK):
        xs, docs = x[lo : lo + CHUNK], owner[lo : lo + CHUNK]
        k = xs.size
        y, t = buf[:k], tmp[:k]
        np.multiply(xs[:, None], a[None, :], out=y)  # < 2^62: no overflow
        y += b
        # y mod p without division (p = 2^31 - 1): fold the high bits down twice, then subtract p once.
        np.right_shift(y, 31, out=t)
        y &= p
        y += t
        np.right_shift(y, 31, out=t)
        y &= p
        y += t  # now <= p + 1
        np.subtract(y, p, out=t)  # wraps around for y < p
        np.minimum(y, t, out=y)
        starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        seg = np.minimum.reduceat(y, starts, axis=0)
        ids = docs[starts]
        sig[ids] = np.minimum(sig[ids], seg)
    return sig


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, valid: np.ndarray | None = None) -> np.ndarray:
    """(pairs, 2) int64 rows (i, j), i < j, sorted: documents whose signatures agree on some whole band.
    Rows where `valid` is False (documents without shingles) take no part."""
    n = sig.shape[0]
    docs = np.arange(n) if valid is None else np.flatnonzero(valid)
    codes: list[np.ndarray] = []
    for band in range(bands):
        part = sig[docs, band * rows : (band + 1) * rows]
        key = np.zeros(docs.size, dtype=np.uint64)
        for col in range(rows):
            key *= np.uint64(_POLY)
            key += part[:, col]
        order = np.argsort(key, kind="stable")
        k = key[order]
        cuts = np.flatnonzero(k[1:] != k[:-1]) + 1
        for group in np.split(order, cuts):
            if group.size > 1:
                members = docs[np.sort(group)]
                i, j = np.triu_indices(members.size, k=1)
                codes.append(members[i].astype(np.int64) * n + members[j])
    if not codes:
        return np.zeros((0, 2), dtype=np.int64)
    code = sorted_unique(np.concatenate(codes))
    return np.stack([code // n, code % n], axis=1)


def containment(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / min(|A|, |B|) of two sorted unique arrays (0 when either is empty)."""
    small, big = (a, b) if a.size <= b.size else (b, a)
    if not small.size:
        return 0.0
    at = np.searchsorted(big, small).clip(max=big.size - 1)
    return float(np.count_nonzero(big[at] == small)) / small.size


@dataclass
class NearDuplicates:
    """What `find_near_duplicates` decided; `dropped` maps a dropped document to the kept one it repeats."""

    dropped: dict[int, int] = field(default_factory=dict)
    candidate_pairs: int = 0
    verified_pairs: int = 0


def find_near_duplicates(
    texts: Sequence[str],
    shingle_words: int = SHINGLE_WORDS,
    num_perm: int = NUM_PERM,
    threshold: float = CONTAINMENT,
    lsh_threshold: float = LSH_THRESHOLD,
    seed: int = MINHASH_SEED,
) -> NearDuplicates:
    """The documents of `texts` (in corpus order) to drop as near-duplicates of earlier kept ones."""
    sets = shingle_sets(texts, shingle_words)
    sig = minhash_signatures(sets, num_perm, seed)
    bands, rows = lsh_params(num_perm, lsh_threshold)
    pairs = candidate_pairs(sig, bands, rows, valid=np.array([s.size > 0 for s in sets], dtype=bool))
    out = NearDuplicates(candidate_pairs=len(pairs))
    # Pairs in order of their later document: the earlier one's fate is settled before it is compared.
    for i, j in pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))].tolist():
        if containment(sets[i], sets[j]) < threshold:
            continue
        out.verified_pairs += 1
        if i not in out.dropped and j not in out.dropped:
            out.dropped[j] = i
    return out


class NgramIndex:
    """The set of n-word windows of some texts (e.g. the train split), to measure overlap against."""

    def __init__(self, texts: Sequence[str], n: int = LEAK_WORDS, hasher: WordHasher | None = None):
        self.n, self.hasher = n, hasher or WordHasher()
        parts = [window_hashes(self.hasher(t), n) for t in texts]
        self.windows = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)

    def contained_fraction(self, texts: Sequence[str]) -> float:
        """Fraction of the n-word windows of `texts` (counted with repeats) that occur in the index;
        0.0 when the texts have no window of n words."""
        parts = [window_hashes(self.hasher(t), self.n) for t in texts]
        h = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        if not h.size:
            return 0.0
        if not self.windows.size:
            return 0.0
        h = np.sort(h)  # sorted queries search much faster; the count is the same
        at = np.searchsorted(self.windows, h).clip(max=self.windows.size - 1)
        return float(np.count_nonzero(self.windows[at] == h)) / h.size


def ngram_leakage(split_texts: Sequence[str], train_texts: Sequence[str], n: int = LEAK_WORDS) -> float:
    """Fraction of the n-word windows of `split_texts` that occur anywhere in `train_texts`."""
    return NgramIndex(train_texts, n).contained_fraction(split_texts)
