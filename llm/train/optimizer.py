"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import gin
import jax
import optax


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


@gin.configurable
def make_optimizer(total_steps: int, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule (gin: make_optimizer.*, and
    learning_rate_schedule.* for the schedule)."""
    schedule = learning_rate_schedule(total_steps)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain), schedule
