"""Which copy of a near-duplicate cluster survives: the unedited original, on planted clusters.

Clusters: an original document and 1-4 copies, each made from the original by independent random
word edits (substitutions, insertions and deletions with words drawn from the corpus vocabulary,
2-6% of the words), all shuffled into a corpus of unrelated documents so the original's input
position is random. `measure()` prints the survival rate per cluster size; the figure in
docs/curation.md comes from `pytest -s tests/curate/test_survivor.py`.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from llm.data.curate import minhash
from llm.data.sources import Document
from tests.curate.corpus import prose, vocab


def _edit(rng: random.Random, words: list[str], vocabulary: list[str], rate: float) -> list[str]:
    out = []
    for w in words:
        r = rng.random()
        if r < rate / 2:
            out.append(rng.choice(vocabulary))                   # substitution
        elif r < rate * 3 / 4:
            out += [w, rng.choice(vocabulary)]                   # insertion
        elif r < rate:
            continue                                             # deletion
        else:
            out.append(w)
    return out


def planted(n_clusters: int = 150, n_other: int = 150, seed: int = 0):
    """(docs, clusters): clusters are lists of positions in docs, original first."""
    rng = random.Random(seed)
    words = vocab(seed=seed)
    texts, groups = [], []
    for _ in range(n_clusters):
        orig = prose(rng, words, sentences=rng.randint(12, 30))
        members = [orig]
        for _ in range(rng.randint(1, 4)):
            rate = rng.uniform(0.02, 0.06)
            members.append("\n".join(" ".join(_edit(rng, line.split(" "), words, rate))
                                     for line in orig.split("\n")))
        groups.append(members)
    texts_other = [prose(rng, words, sentences=rng.randint(12, 30)) for _ in range(n_other)]
    flat = [(g, m, t) for g, members in enumerate(groups) for m, t in enumerate(members)]
    flat += [(-1, 0, t) for t in texts_other]
    rng.shuffle(flat)
    clusters: dict[int, list[int]] = {}
    for pos, (g, m, t) in enumerate(flat):
        texts.append(t)
        if g >= 0:
            clusters.setdefault(g, [None] * len(groups[g]))[m] = pos
    return texts, list(clusters.values())


def measure(cfg: minhash.MinHashConfig, seed: int = 0) -> dict:
    """Survival of the original among detected clusters (at least one copy removed)."""
    texts, clusters = planted(seed=seed)
    items = [(o, Document(str(o), t, "web")) for o, t in enumerate(texts)]
    state = minhash.combine([(0, minhash.analyze(items[:200], cfg)),
                             (1, minhash.analyze(items[200:], cfg))], cfg)
    removed = set(state["removed"].tolist())
    by_size: dict[int, list[bool]] = {}
    for c in clusters:
        if not any(p in removed for p in c):
            continue                                  # not detected at all
        by_size.setdefault(len(c), []).append(c[0] not in removed)
    ok = [x for v in by_size.values() for x in v]
    return {"original_survives": sum(ok) / len(ok), "clusters": len(ok),
            "by_size": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_size.items())}}


def test_original_survives_planted_clusters():
    default = measure(minhash.MinHashConfig())
    earliest = measure(minhash.MinHashConfig(survivor=("ordinal",)))
    print("\nsurvivor = default priority:", default, "\nsurvivor = earliest input:", earliest)
    assert default["clusters"] >= 100
    assert default["original_survives"] >= 0.9
    assert earliest["original_survives"] < 0.7     # the old rule: a coin toss per cluster


def test_source_priority_and_quality_field_decide_first():
    base = Document("a", prose(random.Random(1), vocab(), sentences=20), "crawl",
                    {"domain": "web", "score": 0.2})
    copy = dataclasses.replace(base, id="b", source="wiki", metadata={"domain": "wiki",
                                                                     "score": 0.9})
    items = [(0, base), (1, copy)]
    for cfg, kept in [(minhash.MinHashConfig(), 0),
                      (minhash.MinHashConfig(source_priority=("wiki",)), 1),
                      (minhash.MinHashConfig(quality_field="score"), 1),
                      (minhash.MinHashConfig(source_priority=("web",), quality_field="score"), 0)]:
        state = minhash.combine([(0, minhash.analyze(items, cfg))], cfg)
        assert state["kept_copy"].tolist() == [kept] and state["removed"].tolist() == [1 - kept]


def test_unknown_survivor_key_is_an_error():
    with pytest.raises(ValueError, match="unknown keys"):
        minhash.MinHashConfig(survivor=("source", "pagerank"))


def test_rank_matches_a_plain_sort():
    rng = np.random.default_rng(0)
    n = 50
    ords = np.arange(n, dtype=np.uint64) * 3
    keys = np.stack([rng.integers(0, 2, n), rng.random(n).round(1).view(np.uint64) * 0 +
                     rng.random(n).round(1).astype(np.float64).view(np.uint64),
                     rng.integers(5, 8, n)], axis=1).astype(np.uint64)
    cent = rng.integers(0, 3, n)
    rank = minhash.survivor_rank(ords, keys, cent)
    expect = sorted(range(n), key=lambda i: (int(keys[i, 0]), -int(cent[i]),
                                             -float(keys[i, 1:2].view(np.float64)[0]),
                                             -int(keys[i, 2]), int(ords[i])))
    assert [int(i) for i in np.argsort(rank)] == expect
