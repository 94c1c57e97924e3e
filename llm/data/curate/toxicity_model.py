"""An optional local toxicity classifier, trained in-repo.

Use: `toxicity.scorer = "llm.data.curate.toxicity_model:score"` (with `toxicity.threshold = 0.5`).

A logistic regression over hashed features of the normalized text (the word list's normalization:
lowercase, leetspeak, letter spacing and masks undone): word unigrams and bigrams, character 3- to
5-grams inside words, and one feature for "a listed swear word occurs". It is trained on first use
in each process (about a second, deterministic: L-BFGS from zero) on
`assets/toxicity_train.tsv`, 258 labelled sentences written for training only. That file is not
the frozen evaluation set (`tests/curate/eval_sets/toxicity.tsv`, which shares no sentence with
it), so `python -m tools.eval_filters --scorer llm.data.curate.toxicity_model:score` grades the
model on data it was not trained on. Both sets were written by the same author, in the same
categories (insults, threats, identity attacks, obfuscation; code, medical, legal, news and
animal hard negatives), so the figure is optimistic for text unlike either.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import zlib

import numpy as np

from llm.data.curate import toxicity

TRAIN = os.path.join(os.path.dirname(__file__), "assets", "toxicity_train.tsv")
DIM = 1 << 18
L2 = 1.0
_WORD = re.compile(r"[a-z*']+")


def _normalize(text: str) -> str:
    low = text.lower().translate(toxicity._LEET)
    if toxicity._SPELLED_HINT.search(low):
        low = toxicity._SPELLED.sub(lambda m: re.sub(r"[ .\-_]", "", m.group()), low)
    return low


def _hash(s: str) -> int:
    return zlib.crc32(s.encode("utf-8")) % (DIM - 1)   # deterministic in every process


def features(text: str) -> dict[int, float]:
    """Hashed feature counts (index -> value) of one text, L2-normalized; index DIM-1 is the
    swear-word indicator."""
    words = [w.strip("*'") for w in _WORD.findall(_normalize(text))]
    words = [w for w in words if w]
    feats: dict[int, float] = {}
    grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    for w in words:
        padded = f" {w} "
        grams += [f"c:{padded[i:i + n]}" for n in (3, 4, 5) for i in range(len(padded) - n + 1)]
    for g in grams:
        k = _hash(g)
        feats[k] = feats.get(k, 0.0) + 1.0
    norm = np.sqrt(sum(v * v for v in feats.values())) or 1.0
    feats = {k: v / norm for k, v in feats.items()}
    feats[DIM - 1] = float(toxicity.wordlist_score(text)[1] > 0)
    return feats


def _matrix(texts: list[str]):
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        for k, v in features(t).items():
            rows.append(i)
            cols.append(k)
            vals.append(v)
    return csr_matrix((vals, (rows, cols)), shape=(len(texts), DIM))


def load_training_set(path: str = TRAIN) -> tuple[list[str], np.ndarray]:
    """(texts, labels 0/1) of the training TSV (columns `label`, `text`)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows], np.float64)


def train(texts: list[str], labels: np.ndarray, l2: float = L2) -> np.ndarray:
    """Weights [DIM + 1] (bias last) of an L2-regularized logistic regression (L-BFGS)."""
    from scipy.optimize import minimize

    x = _matrix(texts)
    y = labels

    def loss(w):
        z = x @ w[:-1] + w[-1]
        p = 1.0 / (1.0 + np.exp(-z))
        eps = 1e-12
        f = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)) \
            + 0.5 * l2 * np.dot(w[:-1], w[:-1]) / len(y)
        g = np.empty_like(w)
        r = (p - y) / len(y)
        g[:-1] = x.T @ r + l2 * w[:-1] / len(y)
        g[-1] = r.sum()
        return f, g

    res = minimize(loss, np.zeros(DIM + 1), jac=True, method="L-BFGS-B",
                   options={"maxiter": 500})
    return res.x


@functools.lru_cache(maxsize=1)
def _weights() -> np.ndarray:
    return train(*load_training_set())


def score(text: str) -> float:
    """Probability that `text` is toxic, in [0, 1]."""
    w = _weights()
    z = sum(w[k] * v for k, v in features(text).items()) + w[-1]
    return float(1.0 / (1.0 + np.exp(-z)))
