"""TrainState and its sharded creation.

Parameters are created directly in their final sharding (jit with out_shardings), so a model that
does not fit on one device never materialises on one. Optimizer state takes the sharding XLA
propagates from the parameters (Adam moments follow their parameter).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm.parallel.rules import Rules, tree_shardings


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator.

    step: int32 scalar, number of optimizer updates applied.
    params: nested dict of arrays (see `llm.model.transformer.init`).
    opt_state: the optax state.

    Nothing in the step is random (dropout is not used), so there is no RNG in the state; the
    data pipeline's randomness is keyed by `TrainConfig.seed` and checkpointed with its iterator.
    """

    step: jax.Array
    params: dict
    opt_state: optax.OptState


def create_train_state(init_params: Callable[[jax.Array], dict], abstract_params: dict,
                       logical_axes: dict, tx: optax.GradientTransformation, mesh: Mesh,
                       rules: Rules, seed: int) -> tuple[TrainState, TrainState]:
    """Initialise a sharded TrainState. Returns (state, shardings with the same structure).

    init_params: rng -> params dict, jitted into the shardings; one marked
      `init_params.loads_params = True` returns existing arrays (`llm.posttrain.init.load_base`),
      which are placed instead. abstract_params / logical_axes: the same dict structure holding
      ShapeDtypeStructs and logical axis-name tuples.
    """
    param_shardings = tree_shardings(logical_axes, abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_key, _ = jax.random.split(jax.random.key(seed))  # the split keeps seed -> params
    if getattr(init_params, "loads_params", False):  # e.g. a base run's weights: place them
        params = jax.device_put(init_params(param_key), param_shardings)
    else:
        params = jax.jit(init_params, out_shardings=param_shardings)(param_key)
    # Moments take the sharding XLA propagates from their parameter; scalars (step counts) that
    # depend on no input are replicated.
    compiled = jax.jit(tx.init).lower(params).compile()
    opt_shardings = jax.tree.map(
        lambda s: s if len(s.device_set) == mesh.size else replicated, compiled.output_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        params=params,
        opt_state=opt_state,
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return state, shardings


def abstract_state(state: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
