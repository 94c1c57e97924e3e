"""The losses: one loss function per model kind (forward pass + cross entropy), and the
token-level cross entropy they share.

    loss_fn = decoder_loss(graphdef)          # or encoder_loss / encoder_decoder_loss
    sums = loss_fn(params, batch)             # {"nll", "z_loss", "tokens", "correct", ...}

They return sums and counts, not means, so that gradient accumulation, data parallelism and
evaluation batching all normalise by the true number of target tokens (`llm.train.step`).

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

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llm.model import transformer

Batch = dict[str, jax.Array]
LossFn = Callable[[dict, Batch], dict[str, jax.Array]]  # (params, batch) -> sums


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


def decoder_loss(graphdef, z_loss: float = 0.0) -> LossFn:
    """Next-token / prefix-LM loss of the decoder (`transformer.Decoder`): sums from
    `cross_entropy`.

    A batch with a `prefix` field (the prefix_lm objective) attends bidirectionally over it.
    """

    def loss_fn(params: dict, batch: Batch) -> dict[str, jax.Array]:
        logits = transformer.apply(graphdef, params, batch["inputs"],
                                   positions=batch["positions"],
                                   segment_ids=batch["segment_ids"], prefix=batch.get("prefix"))
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)

    return loss_fn


def encoder_loss(graphdef, z_loss: float = 0.0) -> LossFn:
    """Masked-LM loss of the encoder (`encoder_decoder.Encoder`, bert_mlm rows): cross entropy
    on the selected positions (`loss_mask`); `correct / tokens` is the masked-token accuracy, and
    `row_tokens` counts the non-padding tokens (so tokens / row_tokens is the share that was
    masked)."""

    def loss_fn(params: dict, batch: Batch) -> dict[str, jax.Array]:
        logits = transformer.apply(graphdef, params, batch["inputs"],
                                   positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
        sums = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        sums["row_tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        return sums

    return loss_fn


def encoder_decoder_loss(graphdef, z_loss: float = 0.0) -> LossFn:
    """Denoising loss of the encoder-decoder (span_corruption rows, teacher forced): cross entropy
    over the decoder targets, plus `span_exact_match` sums (spans, spans_exact)."""

    def loss_fn(params: dict, batch: Batch) -> dict[str, jax.Array]:
        logits = transformer.apply(graphdef, params, batch["encoder_inputs"],
                                   batch["decoder_inputs"],
                                   encoder_positions=batch["encoder_positions"],
                                   encoder_segment_ids=batch["encoder_segment_ids"],
                                   decoder_positions=batch["decoder_positions"],
                                   decoder_segment_ids=batch["decoder_segment_ids"])
        sums = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        if "target_span_ids" in batch:
            sums.update(span_exact_match(logits, batch["targets"], batch["target_span_ids"]))
        return sums

    return loss_fn


def span_exact_match(logits: jax.Array, targets: jax.Array, span_ids: jax.Array
                     ) -> dict[str, jax.Array]:
    """Sums for exact-span accuracy: `spans` (number of noise spans) and `spans_exact` (spans whose
    every token is the argmax prediction, teacher forced).

    logits [batch, len, vocab]; targets, span_ids [batch, len] (span_ids: k > 0 on the tokens of
    span k, which are contiguous; 0 elsewhere).
    """
    in_span = span_ids > 0
    wrong = ((jnp.argmax(logits, axis=-1) != targets) & in_span).astype(jnp.int32)
    errors = jnp.cumsum(wrong, axis=1)
    # errors counted before the current span: the running total at the last non-span position.
    before = jax.lax.cummax(jnp.where(in_span, 0, errors), axis=1)
    nxt = jnp.concatenate([span_ids[:, 1:], jnp.zeros_like(span_ids[:, :1])], axis=1)
    span_end = in_span & (nxt != span_ids)
    return {"spans": jnp.sum(span_end).astype(jnp.float32),
            "spans_exact": jnp.sum(span_end & (errors == before)).astype(jnp.float32)}
