"""Validation loss, perplexity and bits per byte over a prepared split.

bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the scored text. It does
not depend on the tokenizer, so it compares across vocabularies and against `gzip -9`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import numpy as np


def summarize(sums: dict[str, float], *, bytes_per_token: float) -> dict[str, float]:
    """Turn summed nll/tokens/correct into loss, perplexity, accuracy and bits per byte.

    bytes_per_token: UTF-8 bytes per scored token of the split (num_bytes / num_tokens); with a
    complete pass, tokens * bytes_per_token is exactly the split's byte count.
    """
    tokens = max(sums["tokens"], 1.0)
    loss = sums["nll"] / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": sums["correct"] / tokens,
        "bits_per_byte": sums["nll"] / math.log(2) / (tokens * bytes_per_token),
        "tokens": sums["tokens"],
    }


def accumulate(eval_fn: Callable, params, batches: Iterable, to_device: Callable,
               max_batches: int | None = None) -> dict[str, float]:
    """Sum eval_fn(params, batch) over batches (all of them if max_batches is None)."""
    total: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        sums = jax.device_get(eval_fn(params, to_device(batch)))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(np.asarray(v))
    if not total:
        raise ValueError("evaluation saw no batches: the validation split is empty.")
    return total
