"""Token-level losses. They return sums and counts, not means, so that gradient accumulation,
data parallelism and evaluation batching all normalise by the true number of target tokens.

The softmax cross entropy has a hand-written backward (`_lse_and_target`). With JAX's default
derivatives XLA:CPU spent about a quarter of the loss head's time outside the three vocab-sized
matmuls: the gradient of `take_along_axis` is a scatter into a zero [batch, seq, vocab] buffer
that is then added to the softmax gradient, and `argmax` (for accuracy) is a variadic
(value, index) reduction that does not vectorise. Here the gradient is one elementwise pass,
softmax * d_lse + onehot * d_target, with the one-hot an iota comparison fused into it, and
accuracy compares the target's logit with the row maximum that the log-sum-exp already computes.
See docs/benchmarks.md, "Training step (CPU)".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _lse_and_target(logits: jax.Array, labels: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log-sum-exp, the label's logit, the row max), each [...], of fp32 logits [..., vocab].

    The row max carries no gradient (it is only compared, for accuracy).
    """
    row_max = jnp.max(logits, axis=-1)
    lse = jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1)) + row_max
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return lse, target, row_max


def _lse_and_target_fwd(logits, labels):
    out = _lse_and_target(logits, labels)
    return out, (logits, labels, out[0])


def _lse_and_target_bwd(res, g):
    logits, labels, lse = res
    d_lse, d_target, _ = g
    onehot = jnp.arange(logits.shape[-1], dtype=labels.dtype) == labels[..., None]
    d_logits = (jnp.exp(logits - lse[..., None]) * d_lse[..., None]
                + jnp.where(onehot, d_target[..., None], 0.0))
    return d_logits, None


_lse_and_target.defvjp(_lse_and_target_fwd, _lse_and_target_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                  z_loss: float = 0.0) -> dict[str, jax.Array]:
    """Masked softmax cross entropy with optional z-loss (PaLM).

    logits: [batch, seq, vocab] fp32; targets: [batch, seq] int; loss_mask: [batch, seq] (0/1).
    Returns sums over the batch: `nll` (sum of -log p(target)), `z_loss` (z_loss * sum lse^2),
    `tokens` (sum of loss_mask), `correct` (tokens whose target has the highest logit; an exact
    tie for the maximum counts as correct, where argmax would pick the lowest index).
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    lse, target_logit, row_max = _lse_and_target(logits, targets.astype(jnp.int32))
    nll = (lse - target_logit) * mask
    correct = (target_logit >= row_max) * mask
    return {
        "nll": jnp.sum(nll),
        "z_loss": z_loss * jnp.sum(jnp.square(lse) * mask),
        "tokens": jnp.sum(mask),
        "correct": jnp.sum(correct),
    }
