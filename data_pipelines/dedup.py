"""Deduplication primitives: exact keys and MinHash-LSH signatures, deterministic everywhere.

Hashes are fixed functions (CRC-32, blake2b, seeded multipliers and permutations), never Python's salted `hash`, so
every Ray worker computes the same signature for the same text.
"""
from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_MULTIPLIERS = np.random.default_rng(20240601).integers(1, 1 << 63, size=64, dtype=np.uint64) | np.uint64(1)
_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def canonical(text: str) -> str:
    """The text dedup compares: lower case, no punctuation, single spaces."""
    return _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def exact_key(text: str) -> int:
    """64-bit hash of the canonical text (collisions are negligible below ~10^9 documents)."""
    return int.from_bytes(hashlib.blake2b(canonical(text).encode("utf-8"), digest_size=8).digest(), "little")


def shingles(text: str, ngram: int, unit: str = "word") -> set[str]:
    canon = canonical(text)
    if unit == "char":
        return {canon[i:i + ngram] for i in range(max(1, len(canon) - ngram + 1))}
    words = canon.split(" ")
    return {" ".join(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))}


class MinHasher:
    """`bands x rows` permutations; `band_keys` gives one 64-bit bucket key per band."""

    def __init__(self, bands: int = 14, rows: int = 8, ngram: int = 5, unit: str = "word", seed: int = 42):
        self.bands, self.rows, self.ngram, self.unit = bands, rows, ngram, unit
        rng = np.random.default_rng(seed)
        n = bands * rows
        self.a = rng.integers(1, 1 << 32, size=n, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=n, dtype=np.uint64)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """[n] uint64 hashes of the text's n-gram shingles (32 significant bits).

        Each word (or character) is hashed once with CRC-32; an n-gram's hash mixes its n unit
        hashes with fixed odd multipliers and a splitmix64 finaliser, all vectorised.
        """
        canon = canonical(text)
        if self.unit == "char":
            units = np.frombuffer(canon.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        else:
            units = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in canon.split(" ")), dtype=np.uint64)
        n = max(1, len(units) - self.ngram + 1)
        mixed = np.zeros(n, dtype=np.uint64)
        for k in range(min(self.ngram, len(units))):
            mixed += units[k:k + n] * _MULTIPLIERS[k]  # wraps mod 2^64, as intended
        mixed ^= mixed >> np.uint64(30)
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
        mixed ^= mixed >> np.uint64(27)
        mixed *= np.uint64(0x94D049BB133111EB)
        mixed ^= mixed >> np.uint64(31)
        return mixed & _MAX32

    def signature(self, text: str) -> np.ndarray:
        """[bands * rows] uint32 MinHash signature."""
        hashes = self.shingle_hashes(text)
        # (a*h + b) mod (2^61 - 1): a, h < 2^32 so a*h + b fits in uint64
        perm = (self.a[:, None] * hashes[None, :] + self.b[:, None]) % _MERSENNE & _MAX32
        return perm.min(axis=1).astype(np.uint32)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """[bands] uint64: a hash of each band's rows (compared only within the same band)."""
        sig = signature.reshape(self.bands, self.rows)
        return np.array([int.from_bytes(hashlib.blake2b(sig[i].tobytes(), digest_size=8).digest(), "little")
                         for i in range(self.bands)], dtype=np.uint64)


def jaccard(a: str, b: str, ngram: int = 5, unit: str = "word") -> float:
    sa, sb = shingles(a, ngram, unit), shingles(b, ngram, unit)
    return len(sa & sb) / max(1, len(sa | sb))


class UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x, y) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller id is the root, so the kept document is deterministic
            if ry < rx:
                rx, ry = ry, rx
            self.parent[ry] = rx


def bucket_edges(doc_ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[n, 2] int64 (member, smallest id of its bucket) for every member that is not the smallest.

    One band's (or the exact hash's) grouping as a sort, so it needs 16 bytes a document and no
    Python object per document.
    """
    order = np.lexsort((doc_ids, keys))
    keys, doc_ids = keys[order], doc_ids[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    head = doc_ids[np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))]
    return np.stack([doc_ids[~first], head[~first]], axis=1).astype(np.int64)


class NearDupIndex:
    """Streams (doc id, band keys); docs that share any band join one cluster.

    `duplicates()` holds every member of a cluster except its smallest id, so which document
    stays depends only on the ids, never on the order they arrived in.
    """

    def __init__(self):
        self._owner: dict = {}
        self._clusters = UnionFind()

    def add(self, doc, band_keys) -> None:
        self._clusters.find(doc)
        for band, key in enumerate(band_keys):
            owner = self._owner.setdefault((band, int(key)), doc)
            if owner != doc:
                self._clusters.union(owner, doc)

    def duplicates(self) -> set:
        return {x for x in self._clusters.parent if self._clusters.find(x) != x}
