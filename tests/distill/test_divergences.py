"""tools.distill_divergences: the per-token statistics against scipy on random distributions."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax
from scipy.stats import entropy

from tools.distill_divergences import token_stats


def test_token_stats_against_scipy():
    rng = np.random.default_rng(0)
    s_logits, t_logits = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
    targets = rng.integers(0, 7, size=(2, 3))
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    got = {k: float(v) for k, v in token_stats(s_logits, t_logits, targets, mask).items()}
    want = dict.fromkeys(["ce", "fkl", "rkl", "jsd", "H(q)", "H(p)", "agree", "q(top-p)"], 0.0)
    for b, t in zip(*np.nonzero(mask)):
        q, p = softmax(s_logits[b, t]), softmax(t_logits[b, t])
        want["ce"] += -np.log(q[targets[b, t]])
        want["fkl"] += entropy(p, q)
        want["rkl"] += entropy(q, p)
        want["jsd"] += jensenshannon(p, q) ** 2
        want["H(q)"] += entropy(q)
        want["H(p)"] += entropy(p)
        want["agree"] += float(q.argmax() == p.argmax())
        want["q(top-p)"] += q[p.argmax()]
    assert got["tokens"] == 5
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
