"""Logical axis names -> mesh axes.

Weights and activations have separate names (as in MaxText), so a rule set says independently
how parameters are stored and how activations are laid out:

  weights      embed, mlp, heads, kv_heads, head_dim, vocab        (`WEIGHT_AXES`)
  activations  activation_batch, activation_length, activation_embed, activation_mlp,
               activation_heads, activation_kv_heads, activation_head_dim, activation_vocab
               (`ACTIVATION_AXES`)

Every parameter carries a tuple of weight names (`logical_axes` metadata), and key activations
are constrained with activation names. A rule set (gin: `axis_rules.rules`, see
gin_configs/mesh/) maps each logical name to a mesh axis, a tuple of mesh axes, or None
(replicated). FSDP, for example, maps `embed` (weights) to `fsdp` and leaves `activation_embed`
unmapped: the batch is split over fsdp and activations are never split along their width.

A dimension whose size is not divisible by the mesh axes it maps to is replicated instead, so one
rule set works for every model size (e.g. 2 kv heads on a tensor axis of 4).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import gin
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm.config import ConfigError

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

WEIGHT_AXES = ("embed", "mlp", "heads", "kv_heads", "head_dim", "vocab")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed", "activation_mlp",
                   "activation_heads", "activation_kv_heads", "activation_head_dim",
                   "activation_vocab")

# Pure data parallel: parameters replicated, batch split over every mesh axis (and over slices:
# "dcn" exists only on a multi-slice mesh; an axis a mesh lacks is skipped).
DATA_PARALLEL: Rules = (("activation_batch", ("dcn", "data", "fsdp")),)


@gin.configurable
def axis_rules(rules: Sequence[Sequence] = DATA_PARALLEL) -> Rules:
    """The active rule set (gin: `axis_rules.rules`). Unlisted logical names are replicated.
    Raises ConfigError for a rule that names an unknown logical or mesh axis."""
    from llm.parallel.mesh import DCN_AXIS, MESH_AXES

    mesh_axes = (DCN_AXIS, *MESH_AXES)

    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ConfigError(f"axis_rules.rules entry {rule!r} must be a pair "
                              "(logical_name, mesh_axes).")
        name, target = rule
        target = tuple(target) if isinstance(target, list) else target
        if name not in WEIGHT_AXES + ACTIVATION_AXES:
            raise ConfigError(f"axis_rules.rules names the logical axis {name!r}, which nothing "
                              f"carries; weights use {', '.join(WEIGHT_AXES)}; activations use "
                              f"{', '.join(ACTIVATION_AXES)}.")
        for axis in (target,) if isinstance(target, str) else (target or ()):
            if axis not in mesh_axes:
                raise ConfigError(f"axis_rules.rules maps {name!r} to {axis!r}, which is not a "
                                  f"mesh axis; use one of {', '.join(mesh_axes)} or None.")
        out.append((name, target))
    return tuple(out)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor whose dims carry `names`.

    Each mesh axis is used at most once per tensor (first dim wins). With `mesh`, axes the mesh
    lacks (e.g. "dcn" on one slice) or of size 1 are dropped; with `shape` too, a dim not
    divisible by its mesh-axes' size is left unsharded.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        divisible = (mesh is None or shape is None
                     or shape[i] % math.prod(mesh.shape[a] for a in axes) == 0)
        if not divisible:
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(names: Sequence[str | None], mesh: Mesh, rules: Rules,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a pytree of arrays, from a same-structure tree of logical-name tuples."""
    return jax.tree.map(
        lambda names, x: named_sharding(names, mesh, rules, x.shape),
        logical_tree, shapes_tree, is_leaf=lambda n: isinstance(n, tuple))


# The mesh and rules that `constrain` uses inside model code, set by `activation_sharding`.
#
# Why a context and not an argument: `constrain` is read only while `jax.jit` traces (the
# compiled program carries the resulting shardings; nothing global is consulted at run time),
# and it is called from deep inside the model (embeddings, every attention and MLP, the
# logits). An explicit argument would be threaded through every module call from the loss down
# to `attend`, or stored in the modules -- and then in the nnx graphdef, tying a model
# definition to one mesh (the same graphdef serves training, evaluation and serving on
# different meshes). It is the design of flax's `nn.logical_axis_rules` (MaxText's
# `with_logical_constraint`) and of JAX's own `use_mesh`. The context is entered only inside
# functions that `jax.jit` traces, in five modules: `llm.train.step` (`jit_train_step`,
# `jit_eval_step`), `llm.eval.lm` (the scorer), `llm.serve.engine`, `llm.posttrain.dpo` (the
# reference log-probabilities) and `llm.posttrain.rl_loop` (`prepare`, `update`).
# Outside it `constrain` is the identity, so a one-device trace is the plain program. It is a
# ContextVar, so a trace in one thread (the server's engine) never sees another thread's mesh.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "llm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context (around tracing), `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_spec(names: Sequence[str | None], shape: Sequence[int]
                ) -> tuple[Mesh, PartitionSpec] | None:
    """(mesh, spec) that `constrain` would use for these names, or None outside
    `activation_sharding` or on a one-device mesh. For code that must shard by hand, such as a
    Pallas kernel under `shard_map`."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return None
    mesh, rules = active
    return mesh, logical_to_spec(names, rules, mesh, shape)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for a rank-{x.ndim} array")
    return jax.lax.with_sharding_constraint(x, named_sharding(names, mesh, rules, x.shape))
