"""Per-sample metric functions and their aggregation, with bootstrap standard errors.

Every task turns model outputs into one record per sample; a metric is an aggregation over the
records (a mean, or a ratio of sums for perplexities), and its standard error is the bootstrap
standard deviation of that aggregation over resampled records (`bootstrap_stderr`), so mean and
non-mean metrics get their error bars the same way.

Definitions follow lm-evaluation-harness 0.4 (lm_eval/api/metrics.py, lm_eval/api/task.py):
- multiple choice: acc = [argmax_i ll_i == gold]; acc_norm = [argmax_i ll_i / len(choice_i) ==
  gold], len in characters of the choice string (without the target delimiter); acc_bytes uses
  the UTF-8 byte length instead.
- loglikelihood: perplexity = exp(-mean ll); acc = mean is_greedy.
- loglikelihood_rolling: word_perplexity = exp(-sum ll / sum words), byte_perplexity =
  exp(-sum ll / sum bytes), bits_per_byte = -sum ll / sum bytes / ln 2; words are
  `re.split(r"\\s+", text)` pieces, as lm-eval counts them.
- generate_until: exact_match (strings equal after stripping surrounding whitespace; the best
  over the gold answers), f1 (SQuAD v1.1 token F1 after its answer normalisation: lower case,
  punctuation and articles a/an/the removed, whitespace collapsed; best over the gold answers).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

BOOTSTRAP_ITERS = 1000


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm (characters) and acc_bytes of one multiple-choice sample."""
    lls = np.asarray(lls, np.float64)
    chars = np.array([len(c) for c in choices], np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in choices], np.float64)
    return {"acc": float(np.argmax(lls) == gold),
            "acc_norm": float(np.argmax(lls / chars) == gold),
            "acc_bytes": float(np.argmax(lls / nbytes) == gold)}


def word_count(text: str) -> int:
    return len(re.split(r"\s+", text))


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation (evaluate-v1.1.py): lower, drop punctuation and articles,
    collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between two answers."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if not pred or not ref:
        return float(pred == ref)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    return {"exact_match": max(float(prediction.strip() == g.strip()) for g in golds),
            "f1": max(token_f1(prediction, g) for g in golds)}


# ---------------------------------------------------------------- aggregation
Aggregate = Callable[[dict[str, np.ndarray]], float]


def mean_of(key: str) -> Aggregate:
    return lambda cols: float(np.mean(cols[key]))


def exp_neg_ratio(num: str, den: str) -> Aggregate:
    """exp(-sum num / sum den): perplexity per word / byte."""
    return lambda cols: float(math.exp(min(-np.sum(cols[num]) / np.sum(cols[den]), 700.0)))


def bits_ratio(num: str, den: str) -> Aggregate:
    """-sum num / sum den / ln 2: bits per byte."""
    return lambda cols: float(-np.sum(cols[num]) / np.sum(cols[den]) / math.log(2))


def exp_neg_mean(key: str) -> Aggregate:
    return lambda cols: float(math.exp(min(-np.mean(cols[key]), 700.0)))


def columns(records: Sequence[dict], keys: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: np.asarray([r[k] for r in records], np.float64) for k in keys}


def bootstrap_stderr(aggregate: Aggregate, cols: dict[str, np.ndarray],
                     iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> float:
    """Standard deviation (ddof=1) of `aggregate` over `iters` resamples (with replacement) of the
    samples. Deterministic for a seed. NaN with fewer than 2 samples."""
    n = len(next(iter(cols.values())))
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(iters)
    for i in range(iters):
        idx = rng.integers(0, n, n)
        values[i] = aggregate({k: v[idx] for k, v in cols.items()})
    return float(np.std(values, ddof=1))


def summarize(records: Sequence[dict], aggregates: dict[str, tuple[Aggregate, list[str]]],
              iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> dict[str, dict[str, float]]:
    """{metric: {"value": aggregate, "stderr": bootstrap stderr}} for each named aggregate, given
    as (function, the record keys it reads)."""
    out = {}
    for name, (fn, keys) in aggregates.items():
        cols = columns(records, keys)
        out[name] = {"value": fn(cols), "stderr": bootstrap_stderr(fn, cols, iters, seed)}
    return out


def mean_aggregates(*keys: str) -> dict[str, tuple[Aggregate, list[str]]]:
    return {k: (mean_of(k), [k]) for k in keys}
