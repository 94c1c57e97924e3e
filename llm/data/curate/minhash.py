"""Near-duplicate removal: MinHash LSH with union-find clustering, vectorized with numpy.

Defaults follow FineWeb: word 5-gram shingles over lowercased, punctuation-free text, 64-bit
hashes, 14 bands x 8 rows (112 permutations). A pair at Jaccard similarity J becomes a candidate
with probability 1 - (1 - J^8)^14: 0.92 at J=0.8, 0.56 at J=0.7, 0.05 at J=0.5.

Everything is numpy over a whole batch of documents: word hashes are a polynomial hash computed
with `np.add.reduceat` over the UTF-8 bytes, shingles are sums of shifted word-hash arrays, and the
112 permutations are one (112 x shingles) multiply-add followed by `np.minimum.reduceat`. Hashes
are seeded constants, never Python's per-process `hash()`, so signatures are the same in every
worker and on every machine.

Per unit, `analyze` returns an (n, 1 + bands) uint64 array [ordinal, band hashes...]; the local
runner spills it to disk as `.npy` (atomically), so a killed run resumes at the first unfinished
unit. `combine` then walks one band at a time (memory: ~72 bytes x documents), links documents
that share a band hash, and takes connected components (scipy).

Which document of a cluster survives is decided by `minhash.survivor`, a priority list of keys
(default `SURVIVOR_KEYS`), each breaking the ties of the one before:
  source      the position of the document's domain (or source name) in `minhash.source_priority`
              (listed first wins; unlisted sources come after all listed ones);
  centrality  how many band-hash collisions the document has inside its cluster, i.e. how many
              of the other copies it resembles (the original of several independently edited
              copies is closer to each of them than they are to each other);
  quality     higher first: the numeric metadata field `minhash.quality_field` (for instance a
              score tagged by an earlier step), or by default the fraction of the document's words
              that are common English function words (`COMMON_WORDS`: a unigram signal; random
              word edits and spam lower it);
  length      more words first;
  ordinal     the earliest input position (always the final tie-break, so the choice is stable).
Per unit, `analyze` returns [ordinal, band hashes..., source rank, quality (float64 bits), words].
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

from llm.config import ConfigError
from llm.data.sources import Document

_M64 = (1 << 64) - 1


@gin.configurable("minhash")
@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    """n_gram: words per shingle. bands x rows: LSH layout (bands*rows permutations).
    seed: hash seed (same seed => same signatures). batch_bytes: text per numpy batch.
    """

    n_gram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    batch_bytes: int = 4_000_000
    survivor: tuple[str, ...] = ("source", "centrality", "quality", "length", "ordinal")
    source_priority: tuple[str, ...] = ()
    quality_field: str = ""

    def __post_init__(self):
        bad = [k for k in self.survivor if k not in SURVIVOR_KEYS]
        if bad:
            raise ConfigError(f"minhash.survivor has unknown keys {bad}; choose from "
                             f"{SURVIVOR_KEYS} (in priority order).")


SURVIVOR_KEYS = ("source", "centrality", "quality", "length", "ordinal")
_COMMON = """the of and to a in is that for it as was with be by on not he i this are or
his from at which but have an they you were her she there been one all we their has would when if
so no will more can who its them than into out about up what do said our also had some these other
then my me him your could after any only over such how most where those may should because each
through very both between during under while being before"""
COMMON_WORDS = tuple(_COMMON.split())


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _constants(seed: int, n: int, salt: int) -> np.ndarray:
    base = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return _splitmix(base ^ np.uint64((seed * 0x632BE59BD9B4E019 + salt) & _M64))


_WORD = np.zeros(256, bool)
_WORD[ord("0"):ord("9") + 1] = True
_WORD[ord("a"):ord("z") + 1] = True
_WORD[0x80:] = True  # bytes of non-ASCII characters (letters of other scripts)


def word_hashes(texts: list[str], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, words_per_doc): a uint64 hash for every word of every text, in order.

    Words are maximal runs of [0-9a-z] and non-ASCII characters after lowercasing, i.e.
    punctuation and whitespace separate words and are otherwise ignored.
    """
    joined = "\x00".join(t.lower() for t in texts) + "\x00"
    b = np.frombuffer(joined.encode("utf-8", "surrogatepass"), np.uint8)
    mask = _WORD[b]
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    lens = ends - starts
    seps = np.flatnonzero(b == 0)
    counts = np.bincount(np.searchsorted(seps, starts), minlength=len(texts))[:len(texts)]
    if len(starts) == 0:
        return np.empty(0, np.uint64), counts
    wb = b[mask].astype(np.uint64) + np.uint64(1)
    cstarts = np.zeros(len(lens), np.int64)
    np.cumsum(lens[:-1], out=cstarts[1:])
    pos = np.arange(len(wb), dtype=np.int64) - np.repeat(cstarts, lens)
    radix = np.full(int(lens.max()), _constants(seed, 1, 7)[0] | np.uint64(1), np.uint64)
    powers = np.cumprod(radix)
    sums = np.add.reduceat(wb * powers[pos], cstarts)
    return _splitmix(sums ^ lens.astype(np.uint64)), counts


def shingle_hashes(wh: np.ndarray, counts: np.ndarray, n: int, seed: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(shingle hashes, shingles_per_doc) for word n-grams that stay within one document.

    A document with 1..n-1 words gets one shingle of all its words; one with none gets none.
    """
    k = _constants(seed, n, 11)
    doc_end = np.cumsum(counts)
    doc_start = doc_end - counts
    nwords = len(wh)
    m = max(nwords - n + 1, 0)
    sh = np.zeros(m, np.uint64)
    for t in range(n):
        sh += wh[t:t + m] * k[t]
    doc_of = np.repeat(np.arange(len(counts)), counts)
    valid = (doc_of[:m] == doc_of[n - 1:n - 1 + m]) if m else np.zeros(0, bool)
    per_doc = np.maximum(counts - n + 1, 0)
    short = np.flatnonzero((counts > 0) & (counts < n))
    if len(short) == 0:
        return _splitmix(sh[valid]), per_doc
    # rare path: documents shorter than one shingle get a single shingle of all their words
    out = []
    valid_idx = np.flatnonzero(valid)
    pos = 0
    per_doc = per_doc.copy()
    for d in range(len(counts)):
        c = per_doc[d]
        if c:
            out.append(sh[valid_idx[pos:pos + c]])
            pos += c
        elif 0 < counts[d] < n:
            w = wh[doc_start[d]:doc_end[d]]
            out.append(np.array([np.sum(w * k[:len(w)])], np.uint64))
            per_doc[d] = 1
    return _splitmix(np.concatenate(out)), per_doc


def signatures(texts: list[str], cfg: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """(len(texts), bands*rows) uint64 MinHash signatures; all-max rows for texts without words."""
    return _signatures(texts, cfg)[0]


def _signatures(texts: list[str], cfg: MinHashConfig, common: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signatures, words per text, words per text that are in the sorted hash array `common`)."""
    n_perm = cfg.bands * cfg.rows
    a = _constants(cfg.seed, n_perm, 3) | np.uint64(1)
    c = _constants(cfg.seed, n_perm, 5)
    sig = np.full((len(texts), n_perm), np.iinfo(np.uint64).max, np.uint64)
    words = np.zeros(len(texts), np.int64)
    hits = np.zeros(len(texts), np.int64)
    i = 0
    while i < len(texts):  # batches of ~batch_bytes of text
        j, size = i, 0
        while j < len(texts) and (j == i or size + len(texts[j]) <= cfg.batch_bytes):
            size += len(texts[j])
            j += 1
        wh, counts = word_hashes(texts[i:j], cfg.seed)
        words[i:j] = counts
        if common is not None and len(wh):
            pos = np.minimum(np.searchsorted(common, wh), len(common) - 1)
            doc = np.repeat(np.arange(j - i), counts)
            hits[i:j] = np.bincount(doc, weights=common[pos] == wh, minlength=j - i)
        sh, per_doc = shingle_hashes(wh, counts, cfg.n_gram, cfg.seed)
        _minhash_into(sig[i:j], sh, per_doc, a, c)
        i = j
    return sig, words, hits


def _minhash_into(sig: np.ndarray, sh: np.ndarray, per_doc: np.ndarray, a: np.ndarray,
                  c: np.ndarray, chunk: int = 1 << 15) -> None:
    docs = np.flatnonzero(per_doc)
    bounds = np.concatenate(([0], np.cumsum(per_doc[docs])))
    k = 0
    while k < len(docs):
        # a run of whole documents holding at most `chunk` shingles (or one big document)
        e = max(int(np.searchsorted(bounds, bounds[k] + chunk, side="right")) - 1, k + 1)
        lo, hi = bounds[k], bounds[e]
        if e == k + 1 and hi - lo > chunk:  # one large document: min over sub-chunks
            acc = sig[docs[k]]
            for s in range(lo, hi, chunk):
                h = a[:, None] * sh[None, s:min(s + chunk, hi)] + c[:, None]
                acc = np.minimum(acc, h.min(axis=1))
            sig[docs[k]] = acc
        else:
            h = a[:, None] * sh[None, lo:hi] + c[:, None]
            sig[docs[k:e]] = np.minimum.reduceat(h, bounds[k:e] - lo, axis=1).T
        k = e


def band_hashes(sig: np.ndarray, cfg: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """(n, bands) uint64 hash of each band's rows; 0 for documents without shingles."""
    empty = np.all(sig == np.iinfo(np.uint64).max, axis=1)
    out = np.zeros((len(sig), cfg.bands), np.uint64)
    k = _constants(cfg.seed, cfg.rows, 13)
    for b in range(cfg.bands):
        h = np.full(len(sig), np.uint64(b + 1), np.uint64)
        for r in range(cfg.rows):
            h = _splitmix(h ^ (sig[:, b * cfg.rows + r] * k[r]))
        h[h == 0] = 1
        out[:, b] = h
    out[empty] = 0
    return out


def _common_hashes(seed: int) -> np.ndarray:
    return np.sort(word_hashes([" ".join(COMMON_WORDS)], seed)[0])


def _source_rank(doc: Document, priority: tuple[str, ...]) -> int:
    for i, name in enumerate(priority):
        if name in (doc.metadata.get("domain"), doc.source):
            return i
    return len(priority)


def analyze(docs: list[tuple[int, Document]], cfg: MinHashConfig = MinHashConfig()
            ) -> np.ndarray:
    """(n, 1 + bands + 3) uint64 for one unit's documents: [ordinal, band hashes..., source
    rank, quality (the bits of a float64), words]."""
    out = np.empty((len(docs), 1 + cfg.bands + 3), np.uint64)
    if docs:
        common = None if cfg.quality_field else _common_hashes(cfg.seed)
        sig, words, hits = _signatures([d.text for _, d in docs], cfg, common)
        out[:, 0] = [o for o, _ in docs]
        out[:, 1:1 + cfg.bands] = band_hashes(sig, cfg)
        out[:, 1 + cfg.bands] = [_source_rank(d, cfg.source_priority) for _, d in docs]
        if cfg.quality_field:
            q = np.array([float(d.metadata.get(cfg.quality_field, 0.0)) for _, d in docs])
        else:
            q = hits / np.maximum(words, 1)
        out[:, 2 + cfg.bands] = q.astype(np.float64).view(np.uint64)
        out[:, 3 + cfg.bands] = words
    return out


def survivor_rank(ords: np.ndarray, keys: np.ndarray, centrality: np.ndarray,
                  cfg: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """Rank (0 = best) of each document by `cfg.survivor`; `ords` sorted, `keys` the aligned
    [source rank, quality bits, words] columns of `analyze`, `centrality` aligned counts."""
    cols = {"source": keys[:, 0].astype(np.int64),
            "centrality": -centrality.astype(np.int64),
            "quality": -keys[:, 1].view(np.float64),
            "length": -keys[:, 2].astype(np.int64),
            "ordinal": ords}
    order = np.lexsort([ords] + [cols[k] for k in reversed(cfg.survivor)])
    rank = np.empty(len(ords), np.int64)
    rank[order] = np.arange(len(ords))
    return rank


def resolve(src: np.ndarray, dst: np.ndarray, rank_of=None) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over duplicate edges between ordinals: (removed ordinals, sorted; the ordinal
    kept for each, aligned). Each connected component keeps its best node by `rank_of(nodes)`
    (lower is better; default: the lowest ordinal)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    src = np.asarray(src, np.uint64)
    dst = np.asarray(dst, np.uint64)
    if len(src) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    nodes, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(src), np.int8), (inv[:len(src)], inv[len(src):])),
                       shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    rank = np.arange(n) if rank_of is None else np.asarray(rank_of(nodes))
    order = np.lexsort((rank, labels))               # by component, best first
    lab = labels[order]
    best = np.empty(labels.max() + 1, np.int64)
    best[lab[np.r_[True, lab[1:] != lab[:-1]]]] = order[np.r_[True, lab[1:] != lab[:-1]]]
    keeper = nodes[best[labels]]
    dup = keeper != nodes
    return nodes[dup], keeper[dup]


def band_edges(partials, bands: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray,
                                              np.ndarray, np.ndarray]:
    """(src, dst, documents, ordinals, survivor keys, centrality): edges linking each document to
    the lowest ordinal sharing one of its band hashes; ordinals sorted, with their
    [source rank, quality bits, words] columns and band-collision counts aligned. `partials` is a
    sequence of (key, analyze array) iterated once per band, so the arrays may be memory-mapped."""
    parts = sorted(partials, key=lambda p: p[0])
    empty = np.empty(0, np.uint64)
    if not parts:
        return empty, empty, 0, empty, np.empty((0, 3), np.uint64), np.empty(0, np.int64)
    ords = np.concatenate([np.asarray(a[:, 0]) for _, a in parts])
    order = np.argsort(ords, kind="stable")
    ords = ords[order]
    keys = np.concatenate([np.asarray(a[:, 1 + bands:4 + bands]) for _, a in parts])[order]
    n = len(ords)
    cent = np.zeros(n, np.int64)
    src, dst = [], []
    for b in range(bands):
        h = np.concatenate([np.asarray(a[:, 1 + b]) for _, a in parts])[order]
        idx = np.argsort(h, kind="stable")   # equal hashes stay in ordinal order
        hs = h[idx]
        same = (hs[1:] == hs[:-1]) & (hs[1:] != 0)
        if not same.any():
            continue
        starts = np.concatenate(([True], ~same))
        run = np.cumsum(starts) - 1
        cent[idx] += np.bincount(run)[run] - 1
        run_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        j = np.flatnonzero(np.concatenate(([False], same)))
        src.append(ords[idx[run_start[j]]])
        dst.append(ords[idx[j]])
    if not src:
        return empty, empty, n, ords, keys, cent
    return np.concatenate(src), np.concatenate(dst), n, ords, keys, cent


def state_from_edges(src: np.ndarray, dst: np.ndarray, docs: int, ords: np.ndarray | None = None,
                     keys: np.ndarray | None = None, centrality: np.ndarray | None = None,
                     cfg: MinHashConfig = MinHashConfig()) -> dict:
    """The combined MinHash state (shared by the local and the Beam runner). Without `ords`, each
    cluster keeps its lowest ordinal."""
    rank_of = None
    if ords is not None and len(ords):
        rank = survivor_rank(ords, keys, centrality, cfg)
        rank_of = lambda nodes: rank[np.searchsorted(ords, nodes)]  # noqa: E731
    removed, kept = resolve(src, dst, rank_of)
    return {"removed": removed, "kept_copy": kept,
            "clusters": int(len(np.unique(kept))), "docs": int(docs)}


def combine(partials, cfg: MinHashConfig = MinHashConfig()) -> dict:
    """Sorted removed ordinals and, aligned with them, the ordinal of the copy that was kept."""
    src, dst, n, ords, keys, cent = band_edges(partials, cfg.bands)
    return state_from_edges(src, dst, n, ords, keys, cent, cfg)


def apply(o: int, doc: Document, state: dict) -> Document | str:
    """Removes every document of a cluster except its survivor."""
    removed = state["removed"]
    i = np.searchsorted(removed, np.uint64(o))
    if i < len(removed) and removed[i] == o:
        return "near_duplicate"
    return doc


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' word n-gram sets (same tokenization as MinHash)."""
    def grams(t: str) -> set:
        wh, _ = word_hashes([t])
        w = wh.tolist()
        return {tuple(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))} if w else set()
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / max(len(ga | gb), 1)
