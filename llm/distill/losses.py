"""Distillation losses: a divergence between the teacher's and the student's next-token
distributions, at a temperature, mixed with the hard-label next-token loss.

    loss per target token = alpha * CE(student, target)
                            + (1 - alpha) * temperature^2 * D(teacher_T || student_T)

p = softmax(teacher_logits / T) and q = softmax(student_logits / T) over the vocabulary (online).
Offline, only the teacher's top-k logits are known: p is renormalised over those k tokens (0
elsewhere) and q stays the student's full softmax, so the divergence is exact for that truncated
teacher -- forward KL sums over the k tokens, JSD adds the closed form of the tokens outside them
((1 - beta) log(1 / (1 - beta)) times the student's mass there), and reverse KL, infinite when p
is 0 where q is not, is refused for k < vocabulary size. k = vocabulary size is exactly the online
loss. (Renormalising q over the k tokens too was tried and fails: the student then learns only
the odds among the teacher's top-k and nothing keeps its mass off the other tokens; see
docs/compression.md.) The T^2 factor (Hinton et al. 2015) keeps the divergence's gradient on
the scale of the hard-label gradient as T changes. Divergences (`DistillLoss.divergence`):

  forward_kl   KL(p || q) = sum p (log p - log q)       mode-covering (the classic KD loss)
  reverse_kl   KL(q || p) = sum q (log q - log p)       mode-seeking (MiniLLM)
  jsd          generalized JSD (GKD, Agarwal et al. 2024) with m = beta p + (1 - beta) q:
               beta KL(p || m) + (1 - beta) KL(q || m); beta = 0.5 is the Jensen-Shannon
               divergence; towards 0 it behaves like forward KL, towards 1 like reverse KL
               (each scaled by beta or 1 - beta), so 0 < beta < 1.

All functions take log-probabilities, so a token the teacher gives probability 0 (underflow)
contributes exactly 0 and never NaN.
"""

from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp

from llm.config import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """What the student minimises (gin: DistillLoss.*).

    divergence: "forward_kl", "reverse_kl" or "jsd".
    temperature: T > 0, applied to both teacher and student logits inside the divergence.
    alpha: weight of the hard-label next-token cross entropy, in [0, 1] (0: pure distillation;
      1: training from scratch, the teacher unused).
    beta: the generalized JSD's interpolation weight, 0 < beta < 1 (only read by "jsd").
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    beta: float = 0.5

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"DistillLoss.divergence={self.divergence!r} is not one of "
                              f"{', '.join(DIVERGENCES)}.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ConfigError(f"DistillLoss.temperature={self.temperature} must be a finite "
                              "number > 0 (1.0: the models' own distributions).")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"DistillLoss.alpha={self.alpha} must be in [0, 1] (the weight of "
                              "the hard-label loss; 0 = pure distillation).")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ConfigError(f"DistillLoss.beta={self.beta} must be in (0, 1) for the "
                              "generalized JSD; use divergence='forward_kl' or 'reverse_kl' for "
                              "the limits.")


def kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities [..., n] -> [...]."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def generalized_jsd(logp: jax.Array, logq: jax.Array, beta: float) -> jax.Array:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; [..., n] -> [...]."""
    logm = jnp.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm)


def divergence(teacher_logp: jax.Array, student_logp: jax.Array, kind: str,
               beta: float = 0.5) -> jax.Array:
    """D(teacher || student) per position: log-probabilities [..., n] over the same support ->
    [...]."""
    if kind == "forward_kl":
        return kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return kl(student_logp, teacher_logp)
    if kind == "jsd":
        return generalized_jsd(teacher_logp, student_logp, beta)
    raise ConfigError(f"divergence {kind!r} is not one of {', '.join(DIVERGENCES)}.")


def soft_targets(student_logits: jax.Array, teacher_logits: jax.Array | None = None, *,
                 topk_values: jax.Array | None = None, topk_indices: jax.Array | None = None,
                 temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(teacher log-probs, student log-probs) at `temperature`, on one support.

    Online: teacher_logits [batch, seq, vocab] -> both over the vocabulary.
    Offline: topk_values / topk_indices [batch, seq, k] (the teacher's k largest logits and their
    token ids) -> the teacher renormalised over those k tokens, and the student's full-vocabulary
    log-probs gathered at them (not renormalised: they sum to log(1 - its mass elsewhere)).
    """
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    if teacher_logits is not None:
        t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
        return jax.nn.log_softmax(t, axis=-1), s
    t = jax.lax.stop_gradient(topk_values.astype(jnp.float32)) / temperature
    s = jnp.take_along_axis(s, topk_indices.astype(jnp.int32), axis=-1)
    return jax.nn.log_softmax(t, axis=-1), s


def distill_sums(student_logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                 config: DistillLoss, *, teacher_logits: jax.Array | None = None,
                 topk_values: jax.Array | None = None, topk_indices: jax.Array | None = None,
                 hard_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums over a batch, in the shape `llm.train.step.train_step` expects.

    student_logits [batch, seq, vocab]; targets, loss_mask [batch, seq]; the teacher as
    `teacher_logits` [batch, seq, vocab] or `topk_values`/`topk_indices` [batch, seq, k].
    hard_mask [batch, seq]: where the hard-label term applies (default loss_mask; on-policy rows,
    whose targets are the student's own samples, set it to 0).

    Returns `nll` (the training objective summed over target tokens: alpha * CE +
    (1 - alpha) T^2 D), `z_loss` (0), `tokens`, `correct` (hard-label accuracy), and the parts:
    `hard_nll` (sum of CE over hard_mask), `divergence` (sum of D over loss_mask).
    """
    from llm.train.loss import cross_entropy

    mask = loss_mask.astype(jnp.float32)
    hard = mask if hard_mask is None else hard_mask.astype(jnp.float32)
    ce = cross_entropy(student_logits, targets, hard)
    sums = {"hard_nll": ce["nll"], "tokens": jnp.sum(mask), "correct": ce["correct"],
            "z_loss": jnp.zeros((), jnp.float32)}
    if config.alpha < 1.0:
        t_logp, s_logp = soft_targets(student_logits, teacher_logits, topk_values=topk_values,
                                      topk_indices=topk_indices, temperature=config.temperature)
        d = divergence(t_logp, s_logp, config.divergence, config.beta)
        if topk_values is not None and topk_values.shape[-1] < student_logits.shape[-1]:
            if config.divergence == "reverse_kl":
                raise ConfigError(
                    f"DistillLoss.divergence='reverse_kl' with the teacher's top "
                    f"{topk_values.shape[-1]} of {student_logits.shape[-1]} tokens is infinite "
                    "(the teacher is 0 outside them); use forward_kl or jsd offline, or "
                    "distill.mode='online'.")
            if config.divergence == "jsd":  # the tokens outside the top-k, where p = 0
                rest = jnp.clip(1.0 - jnp.sum(jnp.exp(s_logp), axis=-1), 0.0, 1.0)
                d = d - (1.0 - config.beta) * math.log1p(-config.beta) * rest
        sums["divergence"] = jnp.sum(d * mask)
    else:
        sums["divergence"] = jnp.zeros((), jnp.float32)
    sums["nll"] = (config.alpha * sums["hard_nll"]
                   + (1.0 - config.alpha) * config.temperature ** 2 * sums["divergence"])
    return sums
