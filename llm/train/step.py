"""The pure training and evaluation steps, and their jit with explicit shardings.

    train_step(state, batch) -> (state, metrics)
    eval_step(params, batch) -> sums

`batch` is a dict of [global_batch, seq] arrays (see `llm.data.objectives`). The loss function
(`llm.train.loss`: model forward + cross entropy) is a parameter, so objectives (next-token, MLM,
span corruption, SFT) swap the loss, not the step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm.parallel.rules import Rules, activation_sharding, named_sharding
from llm.train.loss import Batch, LossFn
from llm.train.state import TrainState


def train_step(state: TrainState, batch: Batch, frozen: dict | None = None, *,
               loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch`, split into `accum_steps` sequential micro-batches.

    The gradient is d(sum of token losses)/d(params) / (number of target tokens), identical for
    any accum_steps and any mesh (up to float reduction order).

    frozen: parameters that are an input of the loss but not trained (the LoRA base, see
    `llm.train.lora`); then `loss_fn(params, batch, frozen, step)` is called instead of
    `loss_fn(params, batch)`.
    """
    extra = () if frozen is None else (frozen, state.step)

    def objective(params, micro_batch):
        sums = loss_fn(params, micro_batch, *extra)
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
    metrics = {
        "loss": sums["nll"] / tokens,
        "z_loss": sums["z_loss"] / tokens,
        "accuracy": sums["correct"] / tokens,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        "tokens": sums["tokens"],
    }
    # Parts a loss reports per target token (e.g. distillation's "per_token/divergence").
    metrics.update({k.removeprefix("per_token/"): v / tokens for k, v in sums.items()
                    if k.startswith("per_token/")})
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params: dict, batch: Batch, *, loss_fn: LossFn) -> dict[str, jax.Array]:
    """Sums (nll, tokens, correct, ...) over one batch; add them up over the eval set."""
    return loss_fn(params, batch)


BATCH_AXES = ("activation_batch", "activation_length")


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Every batch field [batch, seq] is split along batch by the rules' `batch` entry."""
    return named_sharding(BATCH_AXES, mesh, rules)


def jit_train_step(state_shardings: TrainState, mesh: Mesh, rules: Rules,
                   frozen_shardings: dict | None = None, **step_kwargs):
    """train_step jitted with explicit shardings; the old state is donated. With
    `frozen_shardings` the jitted function is (state, batch, frozen) (see `train_step`)."""
    fn = functools.partial(train_step, **step_kwargs)
    replicated = NamedSharding(mesh, PartitionSpec())

    def traced(state, batch, *frozen):
        with activation_sharding(mesh, rules):
            return fn(state, batch, *frozen)

    in_shardings = (state_shardings, batch_sharding(mesh, rules))
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(traced, in_shardings=in_shardings,
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(param_shardings: dict, mesh: Mesh, rules: Rules, loss_fn: LossFn):
    replicated = NamedSharding(mesh, PartitionSpec())

    def traced(params, batch):
        with activation_sharding(mesh, rules):
            return eval_step(params, batch, loss_fn=loss_fn)

    return jax.jit(traced, in_shardings=(param_shardings, batch_sharding(mesh, rules)),
                   out_shardings=replicated)
