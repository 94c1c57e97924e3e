"""Exposure and extraction arithmetic against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from llm.data import canaries
from llm.eval import memorization


def test_exposure_sampled_hand_computed():
    # 7 candidates; 2 of them (1.0, 2.0) are at least as likely as the canary (nll 2.0, tie counts
    # against the canary): rank/|R| ~ (2+1)/(7+1) -> exposure log2(8/3).
    r = memorization.exposure_sampled(2.0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert r["k"] == 2 and r["n"] == 7 and not r["saturated"]
    assert r["exposure"] == pytest.approx(math.log2(8 / 3), abs=1e-12)
    # More likely than all 7: the ceiling log2(8) = 3 bits, flagged as saturated.
    r = memorization.exposure_sampled(0.5, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert r["exposure"] == pytest.approx(3.0) and r["saturated"]
    # Less likely than all of them: exposure 0.
    assert memorization.exposure_sampled(9.0, [1.0, 2.0, 3.0])["exposure"] == 0.0
    with pytest.raises(ValueError):
        memorization.exposure_sampled(1.0, [])


def test_exposure_extrapolated_matches_normal_tail():
    # Candidates from N(20, 2): the skew-normal fit is close to that normal, so the exposure of a
    # canary 4 sigma below the mean is ~ -log2 Phi(-4) = 14.95 bits (beyond the sample's
    # log2(n+1) = 11 bit ceiling), within the fit's sampling error (the fitted skewness of a
    # normal sample moves a 4-sigma tail by about a bit; 1.5 bits allowed).
    rng = np.random.default_rng(0)
    cand = rng.normal(20.0, 2.0, size=2000)
    r = memorization.exposure_extrapolated(12.0, cand, space_size=10**9)
    expected = -math.log2(0.5 * math.erfc(4 / math.sqrt(2)))  # Phi(-4), by hand via erfc
    assert expected == pytest.approx(-math.log2(3.1671e-5), abs=1e-3)  # table: Phi(-4)
    assert r["exposure"] == pytest.approx(expected, abs=1.5)
    assert r["exposure"] > math.log2(2001) + 1  # beyond what sampling alone can resolve
    # Clipped to log2 |R| when the canary is absurdly likely.
    assert memorization.exposure_extrapolated(-1e3, cand, space_size=1024)["exposure"] == 10.0
    # A skewed sample: the fit recovers scipy's own parameters well enough that the CDF at the
    # 1% quantile of the true distribution is ~1% (exposure ~ log2 100 = 6.64).
    cand = stats.skewnorm.rvs(4.0, loc=10, scale=3, size=4000, random_state=1)
    q = stats.skewnorm.ppf(0.01, 4.0, loc=10, scale=3)
    r = memorization.exposure_extrapolated(q, cand, space_size=10**9)
    assert r["exposure"] == pytest.approx(math.log2(100), abs=0.4)


def test_extraction_windows_and_stats():
    docs = [np.arange(100, 170, dtype=np.int32),            # 70 tokens: one window at 0
            np.array([5, 6, 7, 1], np.int32),                # too short
            np.concatenate([np.arange(200, 328), [1]]).astype(np.int32)]  # 128 + EOS: two
    p, s, idx, starts = memorization.extraction_windows(docs, 32, 32, max_windows=10, seed=3)
    assert idx.tolist() == [0, 2, 2] and starts.tolist() == [0, 0, 64]
    assert p.shape == (3, 32) and s.shape == (3, 32)
    assert p[0].tolist() == list(range(100, 132)) and s[0].tolist() == list(range(132, 164))
    assert p[2].tolist() == list(range(264, 296)) and s[2].tolist() == list(range(296, 328))
    # A seeded subset, in document order.
    p2, _, idx2, starts2 = memorization.extraction_windows(docs, 32, 32, max_windows=2, seed=3)
    assert len(idx2) == 2 and list(zip(idx2, starts2)) == sorted(zip(idx2, starts2))
    assert idx2.tolist() == memorization.extraction_windows(docs, 32, 32, 2, seed=3)[2].tolist()

    ref = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    gen = [[1, 2, 3, 4], [1, 2, 9, 4], [1, 2], [7, 2, 3, 4]]
    r = memorization.extraction_stats(gen, ref)
    # exact: 1 of 4; positions equal: 4 + 3 + 2 + 3 = 12 of 16; leading run: 4 + 2 + 2 + 0 = 8.
    assert r["exact"] == 1 and r["rate"] == 0.25
    assert r["stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert r["token_match"] == pytest.approx(12 / 16)
    assert r["mean_prefix_match"] == pytest.approx(8 / 4)


def test_canaries_spec_and_secrets():
    s = canaries.CanarySpec((1, 4), per_count=2, length=6, seed=7)
    cs = canaries.make_canaries(s)
    assert [c.count for c in cs] == [1, 1, 4, 4]
    assert len({c.name for c in cs}) == 4
    assert all(len(c.secret) == 6 and c.secret.isdigit() for c in cs)
    assert cs == canaries.make_canaries(s)  # seeded
    assert cs != canaries.make_canaries(canaries.CanarySpec((1, 4), 2, 6, seed=8))
    assert s.space_size == 10**6
    r = canaries.random_secrets(5000, 2, seed=0)
    counts = np.bincount([int(x) for x in r], minlength=100)
    assert counts.min() > 20  # uniform over 00..99 (expected 50 each)
    with pytest.raises(canaries.DataError, match="canaries.counts"):
        canaries.spec(counts=[4, 4])
    with pytest.raises(canaries.DataError, match="canaries.length"):
        canaries.spec(counts=[1], length=2)
    assert canaries.spec() is None
