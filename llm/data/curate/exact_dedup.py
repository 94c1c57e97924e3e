"""Exact dedup: a 64-bit hash of the normalized text; the first copy in corpus order survives.

Corpus order is the ordinal order (see `records`), so the survivor does not depend on workers
or runner. The global pass holds 16 bytes per document per partition (`partitions` > 1 bounds
memory further: each pass only looks at one slice of the hash space).
"""

from __future__ import annotations

import hashlib

import gin
import numpy as np

from llm.data.sources import Document


def text_hash(text: str, lowercase: bool = False) -> int:
    """Stable 64-bit hash of a document's text."""
    if lowercase:
        text = text.lower()
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def analyze(docs: list[tuple[int, Document]], lowercase: bool = False) -> np.ndarray:
    """(n, 2) uint64 array of [hash, ordinal] for one unit."""
    out = np.empty((len(docs), 2), dtype=np.uint64)
    for i, (o, d) in enumerate(docs):
        out[i, 0] = text_hash(d.text, lowercase)
        out[i, 1] = o
    return out


def combine(partials, partitions: int = 1) -> np.ndarray:
    """Sorted uint64 ordinals of every non-first copy. `partials` may be iterated repeatedly."""
    removed = []
    for part in range(partitions):
        rows = []
        for _, a in partials:
            a = np.asarray(a)
            if partitions > 1:
                a = a[(a[:, 0] % np.uint64(partitions)) == np.uint64(part)]
            rows.append(a)
        if not rows:
            continue
        allr = np.concatenate(rows) if rows else np.empty((0, 2), np.uint64)
        order = np.lexsort((allr[:, 1], allr[:, 0]))  # by hash, then ordinal
        h = allr[order, 0]
        dup = np.zeros(len(h), bool)
        dup[1:] = h[1:] == h[:-1]
        removed.append(allr[order[dup], 1])
    return np.sort(np.concatenate(removed)) if removed else np.empty(0, np.uint64)


def apply(o: int, doc: Document, removed: np.ndarray) -> Document | str:
    """Removes documents whose ordinal the combine step marked as a later copy."""
    i = np.searchsorted(removed, np.uint64(o))
    if i < len(removed) and removed[i] == o:
        return "exact_duplicate"
    return doc


@gin.configurable("exact_dedup")
def exact_dedup_config(lowercase: bool = False, partitions: int = 1) -> dict:
    """Gin knobs: `lowercase` hashes lowercased text; `partitions` bounds the global pass's
    memory to 16 bytes x documents / partitions."""
    return {"lowercase": lowercase, "partitions": partitions}
