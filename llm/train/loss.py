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

The chunked loss head (`chunked_cross_entropy`, `decoder_loss(..., chunk=C)`) never holds the
[batch, seq, vocab] logits: it scans over chunks of C positions, and for each computes the
chunk's logits, its loss sums and -- when differentiated -- at once the chunk's gradient with
respect to the hidden states and its share of the output projection's gradient (the "fused
linear cross entropy" of Liger-Kernel). The backward only scales those by the incoming
cotangent, so the head runs the same three matmuls as the unchunked one (logits, d_hidden,
d_weight); peak memory holds one [batch, C, vocab] chunk instead of the logits and their
gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

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


def _head_dot(x: jax.Array, w: jax.Array, vocab_major: bool) -> jax.Array:
    """x [batch, C, d] . w ([vocab, d] if vocab_major else [d, vocab]) -> fp32 [batch, C, vocab]."""
    dims = (((2,), (1 if vocab_major else 0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _head_chunk(x, w, labels, mask, *, z_loss: float, vocab_major: bool, grads: bool):
    """One chunk: x [batch, C, d], labels / mask [batch, C] -> (sums (nll, z, correct),
    d_x [batch, C, d] and this chunk's d_w, or None without `grads`). The gradients are those
    of nll + z_loss * lse^2 summed over the chunk (cotangent 1)."""
    logits = _head_dot(x, w, vocab_major)
    row_max = jnp.max(logits, axis=-1)
    lse = jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1)) + row_max
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    sums = (jnp.sum((lse - target) * mask), z_loss * jnp.sum(jnp.square(lse) * mask),
            jnp.sum((target >= row_max) * mask))
    if not grads:
        return sums, None, None
    onehot = jnp.arange(logits.shape[-1], dtype=labels.dtype) == labels[..., None]
    d_lse = mask * (1.0 + 2.0 * z_loss * lse)
    d_logits = (jnp.exp(logits - lse[..., None]) * d_lse[..., None]
                - jnp.where(onehot, mask[..., None], 0.0)).astype(x.dtype)
    # d_x = d_logits . w (contract vocab); d_w = x^T . d_logits over the chunk's tokens.
    d_x = jax.lax.dot_general(d_logits, w, (((2,), (0 if vocab_major else 1,)), ((), ())),
                              preferred_element_type=jnp.float32).astype(x.dtype)
    xt = x.reshape(-1, x.shape[-1])
    dl = d_logits.reshape(-1, d_logits.shape[-1])
    if vocab_major:
        d_w = jax.lax.dot_general(dl, xt, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)  # [vocab, d]
    else:
        d_w = jax.lax.dot_general(xt, dl, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)  # [d, vocab]
    return sums, d_x, d_w


def _scan_head(x, w, labels, mask, *, chunk: int, z_loss: float, vocab_major: bool,
               grads: bool):
    """`_head_chunk` over the sequence in chunks of `chunk` positions (lax.scan; the batch dim
    stays whole, so a batch-sharded x stays sharded). Returns (sums, d_x, d_w)."""
    batch, seq, d = x.shape
    n = seq // chunk
    xs = x.reshape(batch, n, chunk, d).swapaxes(0, 1)
    ls = labels.reshape(batch, n, chunk).swapaxes(0, 1)
    ms = mask.reshape(batch, n, chunk).swapaxes(0, 1)
    step = functools.partial(_head_chunk, z_loss=z_loss, vocab_major=vocab_major, grads=grads)

    def body(carry, inp):
        sums, d_w = carry
        (nll, z, correct), d_x, d_w_c = step(*inp[:1], w, *inp[1:])
        sums = (sums[0] + nll, sums[1] + z, sums[2] + correct)
        return (sums, d_w if d_w_c is None else d_w + d_w_c), d_x

    zero = jnp.zeros((), jnp.float32)
    d_w0 = jnp.zeros(w.shape, jnp.float32) if grads else zero
    (sums, d_w), d_xs = jax.lax.scan(body, ((zero, zero, zero), d_w0), (xs, ls, ms))
    d_x = None if d_xs is None else d_xs.swapaxes(0, 1).reshape(batch, seq, d)
    return sums, d_x, d_w


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_head(x, w, labels, mask, chunk, z_loss, vocab_major):
    """(nll + z-loss sum, nll sum, z-loss sum, correct) of the head; only the first is
    differentiated (the others are reported beside it)."""
    (nll, z, correct), _, _ = _scan_head(x, w, labels, mask, chunk=chunk, z_loss=z_loss,
                                         vocab_major=vocab_major, grads=False)
    return nll + z, nll, z, correct


def _chunked_head_fwd(x, w, labels, mask, chunk, z_loss, vocab_major):
    (nll, z, correct), d_x, d_w = _scan_head(x, w, labels, mask, chunk=chunk, z_loss=z_loss,
                                             vocab_major=vocab_major, grads=True)
    return (nll + z, nll, z, correct), (d_x, d_w.astype(w.dtype), labels)


def _chunked_head_bwd(chunk, z_loss, vocab_major, res, g):
    d_x, d_w, labels = res
    g_total = g[0]
    return ((d_x * g_total.astype(d_x.dtype)), (d_w * g_total.astype(d_w.dtype)),
            None, None)


_chunked_head.defvjp(_chunked_head_fwd, _chunked_head_bwd)


def chunked_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array,
                          loss_mask: jax.Array, *, vocab_major: bool, chunk: int,
                          z_loss: float = 0.0) -> dict[str, jax.Array]:
    """`cross_entropy` of the logits x . w without materialising them.

    x: [batch, seq, d_model] hidden states (compute dtype); w: the output projection,
    [vocab, d_model] if vocab_major (a tied embedding) else [d_model, vocab]; targets,
    loss_mask: [batch, seq]. chunk: positions per chunk (seq is padded to a multiple with
    masked positions). Same sums as `cross_entropy(x . w^T, ...)`; the gradient flows to x and
    w through `nll + z_loss` (the train step's objective); each of the two alone carries none.
    """
    seq = x.shape[1]
    chunk = max(1, min(chunk, seq))
    pad = -seq % chunk
    mask = loss_mask.astype(jnp.float32)
    labels = targets.astype(jnp.int32)
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    total, nll, z, correct = _chunked_head(x, w, labels, mask, chunk, float(z_loss),
                                           vocab_major)
    nll, z = jax.lax.stop_gradient(nll), jax.lax.stop_gradient(z)
    return {"nll": total - z, "z_loss": z, "tokens": jnp.sum(mask), "correct": correct}


def decoder_loss(graphdef, z_loss: float = 0.0, chunk: int = 0) -> LossFn:
    """Next-token / prefix-LM loss of the decoder (`transformer.Decoder`): sums from
    `cross_entropy`, or with chunk > 0 from `chunked_cross_entropy` over `chunk` positions at a
    time (the logits are never materialised whole).

    A batch with a `prefix` field (the prefix_lm objective) attends bidirectionally over it.
    """

    def loss_fn(params: dict, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
                      prefix=batch.get("prefix"))
        if chunk <= 0:
            return cross_entropy(model(batch["inputs"], **kwargs), batch["targets"],
                                 batch["loss_mask"], z_loss)
        w, vocab_major = model.head_weight()
        return chunked_cross_entropy(model.features(batch["inputs"], **kwargs), w,
                                     batch["targets"], batch["loss_mask"],
                                     vocab_major=vocab_major, chunk=chunk, z_loss=z_loss)

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
