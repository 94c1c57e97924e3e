"""MinHash LSH: planted near-duplicates at known Jaccard similarity; determinism."""

import random

import numpy as np

from llm.data.curate import minhash
from llm.data.sources import Document
from tests.curate.corpus import vocab


def _planted(n_pairs: int, seed: int = 0):
    """Base docs and, per base, one variant built to a target Jaccard; returns docs, pairs."""
    rng = random.Random(seed)
    words = vocab(seed=seed)
    docs, pairs = [], []
    targets = [0.95, 0.9, 0.85, 0.5, 0.3]
    for i in range(n_pairs):
        base = [rng.choice(words) for _ in range(400)]
        t = targets[i % len(targets)]
        # replacing a fraction q of words spaced out kills ~5q of 5-gram shingles
        q = (1 - t) / (1 + t) / 5 * 1.05
        var = [rng.choice(words) if rng.random() < q else w for w in base]
        docs += [" ".join(base), " ".join(var)]
        pairs.append((2 * i, 2 * i + 1))
    return docs, pairs


def test_planted_near_duplicates_recall_and_precision():
    docs, pairs = _planted(100)
    sims = [minhash.jaccard(docs[a], docs[b]) for a, b in pairs]
    items = [(o, Document(str(o), t, "s")) for o, t in enumerate(docs)]
    state = minhash.combine([(0, minhash.analyze(items[:90])), (1, minhash.analyze(items[90:]))])
    removed = set(state["removed"].tolist())
    high = [b in removed for (a, b), s in zip(pairs, sims) if s >= 0.85]
    low = [b in removed for (a, b), s in zip(pairs, sims) if s <= 0.55]
    assert len(high) >= 40 and len(low) >= 30
    assert sum(high) / len(high) >= 0.95                     # recall at J >= 0.85
    assert sum(low) / len(low) <= 0.1                        # J <= 0.55 rarely merged
    assert not any(a in removed for a, _ in pairs)           # the first copy always survives
    unrelated = {o for o in removed if not any(o == b for _, b in pairs)}
    assert not unrelated                                      # precision: no random merges


def test_signatures_deterministic_and_batch_independent():
    docs, _ = _planted(10, seed=1)
    cfg = minhash.MinHashConfig()
    a = minhash.signatures(docs, cfg)
    b = np.concatenate([minhash.signatures(docs[:3], cfg), minhash.signatures(docs[3:], cfg)])
    small = minhash.signatures(docs, minhash.MinHashConfig(batch_bytes=100))
    assert np.array_equal(a, b) and np.array_equal(a, small)
    assert a.shape == (20, 112) and a.dtype == np.uint64


def test_empty_and_short_documents():
    sig = minhash.signatures(["", "two words", "!!!", "Two, words."])
    bands = minhash.band_hashes(sig)
    assert (bands[0] == 0).all() and (bands[2] == 0).all()        # no words: never clustered
    assert np.array_equal(bands[1], bands[3])                     # same words -> same bands
    assert minhash.jaccard("a b c d e f", "a b c d e f") == 1.0


def test_transitive_clusters_keep_lowest_ordinal():
    rng = random.Random(3)
    words = vocab()
    base = [rng.choice(words) for _ in range(300)]
    chain = [" ".join(base)]
    for _ in range(3):
        w = chain[-1].split()
        w[rng.randrange(len(w))] = "zzz"
        chain.append(" ".join(w))
    items = [(o, Document(str(o), t, "s")) for o, t in zip([40, 10, 30, 20], chain)]
    cfg = minhash.MinHashConfig(survivor=("ordinal",))
    state = minhash.combine([(0, minhash.analyze(items, cfg))], cfg)
    assert sorted(state["removed"].tolist()) == [20, 30, 40]
    assert set(state["kept_copy"].tolist()) == {10}
