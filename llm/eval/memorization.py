"""Memorization audits: canary exposure and verbatim extraction.

**Exposure** (Carlini et al. 2019, "The Secret Sharer", USENIX Security, §4). A canary
`prefix + s` with secret `s` drawn uniformly from a randomness space R was inserted into the
training data (`llm.eval.canaries`). Its log-perplexity is `-log2 P(s | prefix)`; its rank is its
position among all r in R sorted by log-perplexity (rank 1 = the most likely), and

    exposure = log2 |R| - log2 rank.

Scoring all of R (10**9 secrets) is out of reach, so the rank is estimated from `n` secrets drawn
uniformly from R, two ways (both reported):

* **sampled** (the paper's estimate from sampling, §4.2): with k the number of sampled secrets whose
  log-perplexity is <= the canary's, rank/|R| is estimated as (k+1)/(n+1) (the canary counted
  among the samples, so it is never 0) and exposure = log2((n+1)/(k+1)). It cannot exceed
  log2(n+1): a canary more likely than every sample is reported at that ceiling
  (`saturated: true`).
* **extrapolated** (the paper's estimate by extrapolation, §4.3): fit a skew-normal distribution
  to the samples' log-perplexities and take exposure = -log2 CDF(canary's log-perplexity), clipped
  to [0, log2 |R|]. It resolves exposures beyond log2(n+1).

**Verbatim extraction** (the discoverable-memorization test of Carlini et al. 2023, "Quantifying
Memorization Across Neural Language Models"): from windows of `prefix_len + suffix_len` tokens of
documents, greedy decoding from the `prefix_len`-token prefix; the rate at which all `suffix_len`
generated tokens equal the document's, on training documents vs held-out (validation) documents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def exposure_sampled(canary_nll: float, candidate_nlls: Sequence[float]) -> dict:
    """Exposure from a uniform sample of R (see module doc). nll in any fixed log base.

    Returns {"exposure", "k" (samples at least as likely as the canary), "n", "saturated"}.
    """
    cand = np.asarray(candidate_nlls, np.float64)
    if cand.size == 0:
        raise ValueError("exposure_sampled: no candidate secrets were scored.")
    k = int(np.sum(cand <= canary_nll))
    n = int(cand.size)
    return {"exposure": math.log2((n + 1) / (k + 1)), "k": k, "n": n, "saturated": k == 0}


def exposure_extrapolated(canary_nll: float, candidate_nlls: Sequence[float],
                          space_size: int) -> dict:
    """Exposure from a skew-normal fit of the candidates' log-perplexities (see module doc).

    Returns {"exposure", "skewnorm": {"a", "loc", "scale"}}.
    """
    cand = np.asarray(candidate_nlls, np.float64)
    if cand.size < 3:
        raise ValueError("exposure_extrapolated: a skew-normal fit needs >= 3 candidates.")
    a, loc, scale = stats.skewnorm.fit(cand)
    log_cdf = float(stats.skewnorm.logcdf(canary_nll, a, loc, scale))
    exposure = min(max(-log_cdf / math.log(2), 0.0), math.log2(space_size))
    return {"exposure": exposure, "skewnorm": {"a": float(a), "loc": float(loc),
                                               "scale": float(scale)}}


def extraction_windows(docs: Sequence[np.ndarray], prefix_len: int = 32, suffix_len: int = 32,
                       max_windows: int = 256, seed: int = 0, eos_id: int | None = 1,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to `max_windows` (prefix, suffix) pairs from token documents, one per document.

    docs: token-id arrays (a trailing `eos_id` is dropped). Documents shorter than
    `prefix_len + suffix_len` are skipped; from each longer one a window starts at a seeded
    uniform offset. When more documents qualify than `max_windows`, a seeded subset is taken.
    Returns prefixes [n, prefix_len], suffixes [n, suffix_len], document indices [n].
    """
    rng = np.random.default_rng(seed)
    need = prefix_len + suffix_len
    trimmed = [d[:-1] if eos_id is not None and len(d) and d[-1] == eos_id else d for d in docs]
    eligible = [i for i, d in enumerate(trimmed) if len(d) >= need]
    if len(eligible) > max_windows:
        eligible = sorted(rng.choice(eligible, size=max_windows, replace=False).tolist())
    prefixes, suffixes = [], []
    for i in eligible:
        d = np.asarray(trimmed[i])
        start = int(rng.integers(0, len(d) - need + 1))
        prefixes.append(d[start:start + prefix_len])
        suffixes.append(d[start + prefix_len:start + need])
    shape = (0, prefix_len), (0, suffix_len)
    return (np.asarray(prefixes, np.int32).reshape(-1, prefix_len) if prefixes else
            np.zeros(shape[0], np.int32),
            np.asarray(suffixes, np.int32).reshape(-1, suffix_len) if suffixes else
            np.zeros(shape[1], np.int32),
            np.asarray(eligible, np.int64))


def extraction_stats(generated: Sequence[Sequence[int]], suffixes: np.ndarray) -> dict:
    """Exact-suffix rate and token agreement of greedy continuations vs the true suffixes.

    generated: per window, the generated tokens (may be shorter than the suffix if decoding
    stopped at EOS: then it is not an exact match). suffixes: [n, suffix_len].
    Returns {"n", "exact", "rate", "stderr" (binomial), "token_match" (mean fraction of positions
    equal), "mean_prefix_match" (mean number of leading tokens equal)}.
    """
    n, length = suffixes.shape
    if n == 0:
        return {"n": 0, "exact": 0, "rate": float("nan"), "stderr": float("nan"),
                "token_match": float("nan"), "mean_prefix_match": float("nan")}
    exact, token_match, lead = 0, 0.0, 0.0
    for gen, ref in zip(generated, suffixes):
        g = np.full(length, -1, np.int64)
        gen = list(gen)[:length]
        g[:len(gen)] = gen
        eq = g == ref
        exact += bool(eq.all())
        token_match += eq.mean()
        lead += int(np.argmin(eq)) if not eq.all() else length
    rate = exact / n
    return {"n": n, "exact": exact, "rate": rate, "stderr": math.sqrt(rate * (1 - rate) / n),
            "token_match": token_match / n, "mean_prefix_match": lead / n}
