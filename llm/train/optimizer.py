"""AdamW (or Muon) with linear warmup + cosine decay, global-norm clipping and a weight-decay
mask."""

from __future__ import annotations

import gin
import jax
import optax
from optax.contrib import MuonDimensionNumbers, muon

OPTIMIZERS = ("adamw", "muon")


@gin.configurable
def learning_rate_schedule(total_steps: int, peak: float = 3e-3, warmup_steps: int = 100,
                           final_ratio: float = 0.1) -> optax.Schedule:
    """0 -> peak linearly over warmup_steps, then cosine down to peak * final_ratio."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * final_ratio)


def decay_mask(params):
    """Weight decay on matrices only: no decay on norm scales and biases (rank < 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def muon_dimensions(params):
    """Which axes of each parameter Muon orthogonalises: (reduction, output) axes for the hidden
    weight matrices, None (AdamW) for the embedding table, the output head, norms and biases.

    Dense kernels are [*in, *out]: q/k/v [embed, heads, head_dim] reduce axis 0; the attention
    output o [heads, head_dim, embed] reduces (0, 1); MLP and other 2-D kernels reduce 0."""
    def dims(path, p):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys[-1] != "kernel" or p.ndim < 2 or "lm_head" in keys:
            return None
        if p.ndim == 3 and len(keys) >= 2 and keys[-2] == "o":
            return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
        return MuonDimensionNumbers(reduction_axis=0, output_axis=tuple(range(1, p.ndim)))
    return jax.tree_util.tree_map_with_path(dims, params)


@gin.configurable
def make_optimizer(total_steps: int, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                   name: str = "adamw", muon_rms: float = 0.2
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule (gin: make_optimizer.*, and
    learning_rate_schedule.* for the schedule).

    name="adamw": AdamW on every parameter (weight decay on matrices only).
    name="muon": Muon (`optax.contrib.muon`, Nesterov momentum b1, 5 Newton-Schulz steps) on the
    hidden weight matrices (`muon_dimensions`), AdamW (b1, b2, eps, no decay) on the rest; both
    follow the same schedule: Muon's update is scaled to RMS `muon_rms` (Moonlight's
    "consistent RMS"), so AdamW's learning rate carries over.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"make_optimizer.name={name!r} is not one of {OPTIMIZERS} "
                         "(gin: make_optimizer.name).")
    schedule = learning_rate_schedule(total_steps)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    if name == "muon":
        chain.append(muon(schedule, beta=b1, weight_decay=weight_decay,
                          weight_decay_mask=decay_mask, adam_b1=b1, adam_b2=b2, eps=eps,
                          muon_weight_dimension_numbers=muon_dimensions,
                          consistent_rms=muon_rms))
    else:
        chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                 mask=decay_mask))
    return optax.chain(*chain), schedule
