"""Token-level losses. They return sums and counts, not means, so that gradient accumulation,
data parallelism and evaluation batching all normalise by the true number of target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                  z_loss: float = 0.0) -> dict[str, jax.Array]:
    """Masked softmax cross entropy with optional z-loss (PaLM).

    logits: [batch, seq, vocab] fp32; targets: [batch, seq] int; loss_mask: [batch, seq] (0/1).
    Returns sums over the batch: `nll` (sum of -log p(target)), `z_loss` (z_loss * sum lse^2),
    `tokens` (sum of loss_mask), `correct` (argmax hits).
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    labels = targets[..., None].astype(jnp.int32)
    target_logit = jnp.take_along_axis(logits, labels, axis=-1)[..., 0]
    nll = (lse - target_logit) * mask
    correct = (jnp.argmax(logits, axis=-1) == targets) * mask
    return {
        "nll": jnp.sum(nll),
        "z_loss": z_loss * jnp.sum(jnp.square(lse) * mask),
        "tokens": jnp.sum(mask),
        "correct": jnp.sum(correct),
    }
