"""The pure training and evaluation steps.

    train_step(state, batch) -> (state, metrics)
    eval_step(params, batch) -> sums

`batch` is a dict of [global_batch, seq] arrays (see `llm.data.objectives`). The loss function is a
parameter, so objectives (next-token, MLM, span corruption, SFT) swap the loss, not the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm.model import transformer
from llm.parallel.rules import Rules, activation_sharding, named_sharding
from llm.train.loss import cross_entropy
from llm.train.state import TrainState

Batch = dict[str, jax.Array]
LossFn = Callable[[dict, Batch], dict[str, jax.Array]]  # (params, batch) -> sums


def decoder_loss(graphdef, z_loss: float = 0.0) -> LossFn:
    """Next-token / prefix-LM loss of the decoder-only model: sums from `cross_entropy`.

    A batch with a `prefix` field (the prefix_lm objective) attends bidirectionally over it.
    """

    def loss_fn(params: dict, batch: Batch) -> dict[str, jax.Array]:
        logits = transformer.apply(graphdef, params, batch["inputs"],
                                   positions=batch["positions"],
                                   segment_ids=batch["segment_ids"], prefix=batch.get("prefix"))
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)

    return loss_fn


def encoder_loss(graphdef, z_loss: float = 0.0) -> LossFn:
    """Masked-LM loss of the encoder-only model (bert_mlm rows): cross entropy on the selected
    positions (`loss_mask`); `correct / tokens` is the masked-token accuracy, and `row_tokens`
    counts the non-padding tokens (so tokens / row_tokens is the share that was masked)."""

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


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch`, split into `accum_steps` sequential micro-batches.

    The gradient is d(sum of token losses)/d(params) / (number of target tokens), identical for
    any accum_steps and any mesh (up to float reduction order).
    """

    def objective(params, micro_batch):
        sums = loss_fn(params, micro_batch)
        return sums["nll"] + sums["z_loss"], sums

    grad_fn = jax.grad(objective, has_aux=True)
    if accum_steps == 1:
        grads, sums = grad_fn(state.params, batch)
    else:
        micro = jax.tree.map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

        def body(carry, mb):
            g, s = grad_fn(state.params, mb)
            return jax.tree.map(jnp.add, carry, (g, s)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params,
                                                           jax.tree.map(lambda x: x[0], micro)))
        (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
    metrics = {
        "loss": sums["nll"] / tokens,
        "z_loss": sums["z_loss"] / tokens,
        "accuracy": sums["correct"] / tokens,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        "tokens": sums["tokens"],
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng))
    return new_state, metrics


def eval_step(params: dict, batch: Batch, *, loss_fn: LossFn) -> dict[str, jax.Array]:
    """Sums (nll, tokens, correct, ...) over one batch; add them up over the eval set."""
    return loss_fn(params, batch)


BATCH_AXES = ("batch", "length")


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Every batch field [batch, seq] is split along batch by the rules' `batch` entry."""
    return named_sharding(BATCH_AXES, mesh, rules)


def jit_train_step(state_shardings: TrainState, mesh: Mesh, rules: Rules, **step_kwargs):
    """train_step jitted with explicit shardings; the old state is donated."""
    fn = functools.partial(train_step, **step_kwargs)
    replicated = NamedSharding(mesh, PartitionSpec())

    def traced(state, batch):
        with activation_sharding(mesh, rules):
            return fn(state, batch)

    return jax.jit(traced, in_shardings=(state_shardings, batch_sharding(mesh, rules)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(param_shardings: dict, mesh: Mesh, rules: Rules, loss_fn: LossFn):
    replicated = NamedSharding(mesh, PartitionSpec())

    def traced(params, batch):
        with activation_sharding(mesh, rules):
            return eval_step(params, batch, loss_fn=loss_fn)

    return jax.jit(traced, in_shardings=(param_shardings, batch_sharding(mesh, rules)),
                   out_shardings=replicated)
