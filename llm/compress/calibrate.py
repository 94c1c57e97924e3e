"""Calibration statistics: the input Gram matrix of every matmul weight, from real training rows.

GPTQ needs H = X^T X of each linear layer's input X [tokens, K]; Wanda needs the per-feature
input norms ||X[:, k]||_2 = sqrt(diag(H)); AWQ needs H and the mean magnitude mean_t |X[t, k]|.
All come from one jitted pass per calibration batch
over the float model, in which every `Dense` (and the tied output layer, `Embed.attend`) also
accumulates its input's Gram matrix. The model code is not changed: inside the trace the
merged modules are switched to recording subclasses of `Dense` / `Embed`.

The rows are drawn from the *training* split (never validation: the report evaluates there).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llm.config import ConfigError
from llm.data.pipeline import make_dataset
from llm.model.layers import Dense, Embed


class _Sink:
    """Collects {path: Gram [K, K]} during one trace."""

    def __init__(self):
        self.grams: dict[str, jax.Array] = {}
        self.abs_sums: dict[str, jax.Array] = {}
        self.mask: jax.Array | None = None

    def add(self, key: str, x2: jax.Array) -> None:
        if self.mask is not None:
            x2 = x2 * self.mask.reshape(-1, 1)
        g = jnp.dot(x2.T, x2, preferred_element_type=jnp.float32)
        a = jnp.sum(jnp.abs(x2), axis=0)
        self.grams[key] = self.grams[key] + g if key in self.grams else g
        self.abs_sums[key] = self.abs_sums[key] + a if key in self.abs_sums else a


class _RecordingDense(Dense):
    def __call__(self, x):
        k = math.prod(self.kernel.shape[:self.n_in])
        self._sink.add(self._key, x.astype(jnp.float32).reshape(-1, k))
        return super().__call__(x)


class _RecordingEmbed(Embed):
    def attend(self, x):
        self._sink.add(self._key, x.astype(jnp.float32).reshape(-1, x.shape[-1]))
        return super().attend(x)


def _instrument(model: nnx.Module, sink: _Sink) -> None:
    for path, module in nnx.iter_modules(model):
        key = "/".join(str(p) for p in path)
        if type(module) is Dense:
            object.__setattr__(module, "__class__", _RecordingDense)
            object.__setattr__(module, "_key", f"{key}/kernel")
        elif type(module) is Embed:
            object.__setattr__(module, "__class__", _RecordingEmbed)
            object.__setattr__(module, "_key", f"{key}/embedding")
        else:
            continue
        object.__setattr__(module, "_sink", sink)


def gram_matrices(graphdef: nnx.GraphDef, params: dict, batches: list[dict]
                  ) -> tuple[dict[str, np.ndarray], int]:
    """({"layer_0/attn/q/kernel": H [K, K] float64, ..., "embed/embedding": H [embed, embed]},
    number of tokens). H = sum over real (non-padding) tokens of x x^T, x the layer's input in
    the contraction-first flattening of `quantize.to_2d`. batches: dicts with inputs,
    positions, segment_ids [batch, seq]. Raises ConfigError when there are no batches/tokens."""
    grams, _, tokens = input_statistics(graphdef, params, batches)
    return grams, tokens


def input_statistics(graphdef: nnx.GraphDef, params: dict, batches: list[dict]
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(grams as in `gram_matrices`, {path: mean over real tokens of |x| [K] float64}, tokens)."""
    if not batches:
        raise ConfigError("the calibration set is empty: calibration_batches must be >= 1 and "
                          "the training split must hold at least one row.")

    @jax.jit
    def one(params, batch):
        sink = _Sink()
        sink.mask = (batch["segment_ids"] > 0).astype(jnp.float32)
        model = nnx.merge(graphdef, params)
        _instrument(model, sink)
        model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        return sink.grams, sink.abs_sums, jnp.sum(sink.mask)

    total: dict[str, np.ndarray] = {}
    abs_total: dict[str, np.ndarray] = {}
    tokens = 0
    for batch in tqdm(batches, desc="calibrate", leave=False):
        batch = {k: jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids")}
        grams, abs_sums, n = one(params, batch)
        tokens += int(n)
        for k, g in grams.items():
            g = np.asarray(g, np.float64)
            total[k] = total[k] + g if k in total else g
            a = np.asarray(abs_sums[k], np.float64)
            abs_total[k] = abs_total[k] + a if k in abs_total else a
    if tokens == 0:
        raise ConfigError("the calibration set is empty: its rows hold no tokens.")
    return total, {k: a / tokens for k, a in abs_total.items()}, tokens


def calibration_batches(data_dir: str, *, num_batches: int, batch_size: int, seq_len: int,
                        seed: int = 0) -> list[dict]:
    """The first `num_batches` shuffled batches [batch_size, seq_len] of the training split."""
    if num_batches < 1:
        raise ConfigError(f"calibration_batches={num_batches}: the calibration set is empty; "
                          "use at least 1 batch (e.g. 8).")
    ds = make_dataset(data_dir, "train", seq_len=seq_len, global_batch_size=batch_size,
                      seed=seed, shuffle=True, num_epochs=1, process_index=0, process_count=1)
    out = []
    for batch in ds:
        out.append(batch)
        if len(out) == num_batches:
            break
    if not out:
        raise ConfigError(f"the calibration set is empty: the training split of {data_dir!r} "
                          "yields no batches.")
    return out
