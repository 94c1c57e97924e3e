"""On-policy distillation (GKD, Agarwal et al. 2024): on a share of the steps the student trains
on its own samples, scored by the teacher.

On such a step every row of the data batch gives a prompt (the first `OnPolicy.prompt_len`
tokens of its first document), the student continues it with the KV-cache sampler
(`llm.serve.sampler.generate`, the current parameters, at `OnPolicy.temperature`) up to the row
length, and the row becomes prompt + sample as one document. The loss is the divergence on the
sampled tokens only (`loss_mask`); the hard-label term is off there (`hard_mask` = 0: the targets
are the student's own tokens). The teacher scores the samples inside the jitted step, as online.

Which steps are on-policy and the sampling key both derive from (seed, step), so a resumed run
draws the same samples. On several processes each one gathers the global batch and the student,
samples every row and keeps its own rows (`sample_global_batch`), so the samples are the ones a
single process draws.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from llm.config import ConfigError
from llm.data.objectives import EOS_ID, shift_right


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """gin: OnPolicy.*

    fraction: share of steps trained on student samples (GKD's lambda), in [0, 1]; 0 = off.
    prompt_len: prompt tokens taken from each data row (>= 1, < TrainConfig.seq_len).
    temperature: the student's sampling temperature (> 0; GKD samples at 1).
    """

    fraction: float = 0.0
    prompt_len: int = 32
    temperature: float = 1.0

    def check(self, seq_len: int) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"OnPolicy.fraction={self.fraction} must be in [0, 1] (the share "
                              "of steps trained on student samples; 0 = off).")
        if self.fraction and not 1 <= self.prompt_len < seq_len:
            raise ConfigError(f"OnPolicy.prompt_len={self.prompt_len} must be in [1, "
                              f"TrainConfig.seq_len={seq_len}).")
        if self.fraction and not self.temperature > 0:
            raise ConfigError(f"OnPolicy.temperature={self.temperature} must be > 0.")


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), stream]))


def is_on_policy(config: OnPolicy, seed: int, step: int) -> bool:
    """Whether step `step` (0-based) trains on samples: a fixed draw per (seed, step)."""
    return config.fraction > 0 and _rng(seed, step, 0).random() < config.fraction


def prompts_of(batch: dict[str, np.ndarray], prompt_len: int) -> list[list[int]]:
    """The first `prompt_len` tokens of each row's first document (fewer if it is shorter)."""
    out = []
    for targets, seg in zip(batch["targets"], batch["segment_ids"]):
        first = targets[(seg == seg[0]) & (seg > 0)] if seg[0] > 0 else targets[:1]
        out.append([int(t) for t in first[:prompt_len]] or [int(targets[0])])
    return out


def sampled_rows(prompts: list[list[int]], samples: list[list[int]], seq_len: int,
                 max_new_tokens: int) -> dict[str, np.ndarray]:
    """Rows of prompt + sample (+ EOS when the sampler stopped on it), one document each:
    next-token fields plus `hard_mask` (0); `loss_mask` is 1 on the sampled tokens."""
    n = len(prompts)
    targets = np.zeros((n, seq_len), np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    loss_mask = np.zeros((n, seq_len), np.float32)
    for i, (p, s) in enumerate(zip(prompts, samples)):
        tokens = list(p) + list(s) + ([EOS_ID] if len(s) < max_new_tokens else [])
        tokens = tokens[:seq_len]
        targets[i, :len(tokens)] = tokens
        seg[i, :len(tokens)] = 1
        loss_mask[i, len(p):len(tokens)] = 1.0
    positions = np.where(seg > 0, np.arange(seq_len, dtype=np.int32)[None], 0).astype(np.int32)
    inputs = np.stack([shift_right(t, s) for t, s in zip(targets, seg)])
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "segment_ids": seg,
            "positions": positions, "hard_mask": np.zeros((n, seq_len), np.float32)}


def sample_batch(batch: dict[str, np.ndarray], *, graphdef, params: dict, cfg, config: OnPolicy,
                 seed: int, step: int) -> dict[str, np.ndarray]:
    """The on-policy replacement of a host batch: student samples from the batch's prompts."""
    from llm.serve.sampler import generate

    seq_len = batch["targets"].shape[1]
    prompts = prompts_of(batch, config.prompt_len)
    max_new = seq_len - config.prompt_len  # fixed, so the sampler compiles once
    seed_s = int(_rng(seed, step, 1).integers(2**31 - 1))
    samples = generate(graphdef, params, cfg, prompts, max_new_tokens=max_new,
                       temperature=float(config.temperature), top_k=0, seed=seed_s)
    return sampled_rows(prompts, samples, seq_len, max_new)


def host_copy(tree):
    """A whole (global) pytree of jax.Arrays as numpy on this host: device_get on one process;
    on several, an all-gather (`multihost_utils.process_allgather`) to a full replica."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def sample_global_batch(batch: dict[str, jax.Array], sharding: jax.sharding.Sharding, *,
                        graphdef, params: dict, cfg, config: OnPolicy, seed: int,
                        step: int) -> dict[str, jax.Array]:
    """`sample_batch` on a global batch (any number of processes) -> global arrays laid out by
    `sharding`.

    batch: global arrays [global_batch, seq]; params: the student's (global, any sharding).
    Every process gathers the whole batch and the whole student to host memory, samples every
    row with the same key (the same jitted sampler on the same inputs: the same tokens as one
    process would draw) and places only the rows its devices hold. The sampling work is repeated
    on each process and each holds a full replica of the student while it samples; that is the
    price of row results that do not depend on the process count.
    """
    full = sample_batch(host_copy(batch), graphdef=graphdef, params=host_copy(params), cfg=cfg,
                        config=config, seed=seed, step=step)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in full.items()}
