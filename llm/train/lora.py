"""LoRA and QLoRA as transforms of the parameter pytree (Hu et al. 2021; Dettmers et al. 2023).

The model code does not change. Each adapted projection kernel W [*in_shape, *out_shape] (a
`llm.model.layers.Dense` chosen by a regex over its parameter path, e.g. "layer_0/attn/q/kernel")
gets two trainable factors

    a [*in_shape, rank]   logical axes (*in_axes, None)    init N(0, 1/fan_in)
    b [rank, *out_shape]  logical axes (None, *out_axes)   init 0

and inside the loss the full parameters are rebuilt as W + (alpha / rank) * a . b, so the base
W is an ordinary (frozen) argument of the jitted step: no gradient, no optimizer state, sharded by
the same logical-axis rules as in pretraining, and so are a and b (the rank axis is replicated).

    plan = make_plan(graphdef, abstract_params, logical_axes)   # gin LoraConfig; None when off
    adapters = init_adapters(plan, rng)          # the trainable pytree
    frozen = freeze(plan, base_params)           # the base (QLoRA: quantized kernels)
    params = combine(plan, adapters, frozen)     # -> transformer.apply(graphdef, params, ...)

Rebuilding W' costs rank * |W| multiply-adds per step and makes merged and unmerged outputs
identical by construction (the same arithmetic produces W'). The backward pass still forms the
full weight gradient x^T dy of each adapted kernel before contracting it to a and b, so a step
costs about as much compute as full fine-tuning; what LoRA saves here is memory (trainable
parameters, optimizer state, and with QLoRA the base).

Dropout (LoRA's dropout on the adapter input) is applied to the input features of `a`: one
Bernoulli mask over the fan-in per step and adapter, scaled by 1/(1-p). It
regularises the same path as PEFT's per-token input dropout but shares the mask across the
step's tokens; see docs/post_training.md.

QLoRA: with `LoraConfig.quant` set, `freeze` stores each adapted kernel quantized
(`llm.compress.quantize`: int8 per channel, or int4 / NF4 group-wise) and `combine` dequantizes
it inside the jitted step.

`LoraConfig.train_also` (PEFT's modules_to_save) names parameters trained in full beside the
adapters, e.g. the embedding table when SFT appended chat tokens to the vocabulary: their rows
would otherwise stay at their initial values. They live in the trainable tree at their own path
and are saved with the adapters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from llm.compress import quantize
from llm.config import ConfigError
from llm.model.layers import Dense

QUANT_KINDS = (None, *quantize.METHODS)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings (gin: LoraConfig.*). Off by default; off costs nothing.

    targets: regex searched in each projection kernel's "/"-joined parameter path
      ("layer_0/attn/q/kernel", "layer_1/mlp/wo/kernel", "lm_head/kernel"). The default adapts
      every attention and MLP projection (QLoRA's all-linear choice).
    rank, alpha: the adapter rank r and the scale alpha / r of its update.
    dropout: drop probability of the adapter's input features during training.
    quant: None (LoRA), "int8", "int4" or "nf4" (QLoRA: the adapted base kernels quantized).
    group_size: int4/NF4 quantization group along the kernel's input (fan-in) dimension.
    train_also: regex of parameter paths trained in full beside the adapters ("" for none), e.g.
      "embed/embedding".
    """

    enabled: bool = False
    targets: str = r"(attn/(q|k|v|o)|mlp/(wi|wg|wo))/kernel"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    quant: str | None = None
    group_size: int = 64
    train_also: str = ""

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"LoraConfig.rank={self.rank} must be >= 1.")
        if self.alpha <= 0:
            raise ConfigError(f"LoraConfig.alpha={self.alpha} must be > 0 (the update is "
                              "scaled by alpha / rank).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout={self.dropout} must be in [0, 1).")
        if self.quant not in QUANT_KINDS:
            raise ConfigError(f"LoraConfig.quant={self.quant!r} is not one of "
                              f"{', '.join(map(repr, QUANT_KINDS))}.")
        if self.group_size < 1:
            raise ConfigError(f"LoraConfig.group_size={self.group_size} must be >= 1.")
        for field in ("targets", "train_also"):
            try:
                re.compile(getattr(self, field))
            except re.error as e:
                raise ConfigError(f"LoraConfig.{field}={getattr(self, field)!r} is not a valid "
                                  f"regular expression ({e}).") from None


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: its path in the params dict, its [*in_shape, *out_shape] split and
    the logical axis names of both sides."""

    path: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    dtype: Any

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """Which kernels are adapted and how (see `make_plan`)."""

    cfg: LoraConfig
    targets: tuple[Target, ...]
    full: tuple[tuple[str, ...], ...] = ()  # paths trained in full (`LoraConfig.train_also`)

    @property
    def scale(self) -> float:
        return self.cfg.alpha / self.cfg.rank


def param_names(abstract_params: dict) -> list[str]:
    """Every parameter's "/"-joined path, in tree order."""
    return ["/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]


def make_plan(graphdef: nnx.GraphDef, abstract_params: dict, logical_axes: dict,
              cfg: LoraConfig | None = None) -> LoraPlan | None:
    """The adapted kernels of a model (`transformer.abstract(...)` outputs), or None when LoRA is
    off. cfg defaults to the gin-configured `LoraConfig()`.

    Raises ConfigError when `cfg.targets` matches no projection kernel, listing some names.
    """
    cfg = LoraConfig() if cfg is None else cfg
    if not cfg.enabled:
        return None
    pattern = re.compile(cfg.targets)
    module = nnx.merge(graphdef, abstract_params)
    targets = []
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, Dense):
            continue
        kpath = (*map(str, path), "kernel")
        if not pattern.search("/".join(kpath)):
            continue
        kernel = _get(abstract_params, kpath)
        axes = tuple(_get(logical_axes, kpath))
        n = node.n_in
        targets.append(Target(kpath, tuple(kernel.shape[:n]), tuple(kernel.shape[n:]),
                              axes[:n], axes[n:], kernel.dtype))
    if not targets:
        names = param_names(abstract_params)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(f"LoraConfig.targets={cfg.targets!r} matches no projection kernel; "
                          f"parameter names are {shown} (e.g. LoraConfig.targets="
                          "'attn/(q|v)/kernel').")
    full = ()
    if cfg.train_also:
        also = re.compile(cfg.train_also)
        full = tuple(tuple(n.split("/")) for n in param_names(abstract_params)
                     if also.search(n))
        names = {t.name for t in targets}
        if not full or names & {"/".join(p) for p in full}:
            what = "matches no parameter" if not full else "overlaps LoraConfig.targets"
            raise ConfigError(f"LoraConfig.train_also={cfg.train_also!r} {what}; parameter "
                              f"names are {', '.join(param_names(abstract_params)[:8])}, ...")
    return LoraPlan(cfg, tuple(sorted(targets, key=lambda t: t.path)), full)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of the nested dict `tree` with `path` set to `value` (other subtrees shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree.get(path[0], {}), path[1:], value)
    return out


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
    out: dict = {}
    for path, value in items:
        out = _set(out, path, value)
    return out


def abstract_adapters(plan: LoraPlan, abstract_params: dict | None = None) -> dict:
    """ShapeDtypeStructs of the trainable tree: {...path...: {"a": [*in, r], "b": [r, *out]}}
    per target, and the `train_also` parameters at their own paths (`abstract_params` is needed
    only when the plan has any)."""
    r = plan.cfg.rank
    return _nest([(t.path, {"a": jax.ShapeDtypeStruct((*t.in_shape, r), t.dtype),
                            "b": jax.ShapeDtypeStruct((r, *t.out_shape), t.dtype)})
                  for t in plan.targets] + [(p, _get(abstract_params, p)) for p in plan.full])


def adapter_axes(plan: LoraPlan, logical_axes: dict | None = None) -> dict:
    """Logical axis names of the trainable tree (the rank axis is unnamed: replicated;
    `logical_axes`, the model's, is needed only for `train_also` parameters)."""
    return _nest([(t.path, {"a": (*t.in_axes, None), "b": (None, *t.out_axes)})
                  for t in plan.targets] + [(p, _get(logical_axes, p)) for p in plan.full])


def init_adapters(plan: LoraPlan, rng: jax.Array, base: dict | None = None) -> dict:
    """a ~ N(0, 1/fan_in) (so a.x has unit scale), b = 0: the adapted model starts exactly at
    the base model. The `train_also` parameters start at their values in `base` (needed when
    the plan has any)."""
    # copies: a train step donates the trainable state, and the frozen base keeps its own arrays
    items = [(p, jnp.copy(_get(base, p))) for p in plan.full]
    for i, t in enumerate(plan.targets):
        fan_in = math.prod(t.in_shape)
        a = jax.random.normal(jax.random.fold_in(rng, i), (*t.in_shape, plan.cfg.rank),
                              jnp.float32) / math.sqrt(fan_in)
        items.append((t.path, {"a": a.astype(t.dtype),
                               "b": jnp.zeros((plan.cfg.rank, *t.out_shape), t.dtype)}))
    return _nest(items)


def num_trainable(plan: LoraPlan, abstract_params: dict) -> int:
    """Number of trainable parameters: the adapters plus the `train_also` parameters."""
    return (sum(plan.cfg.rank * (math.prod(t.in_shape) + math.prod(t.out_shape))
                for t in plan.targets)
            + sum(math.prod(_get(abstract_params, p).shape) for p in plan.full))


def delta(plan: LoraPlan, target: Target, adapter: dict, rng: jax.Array | None = None
          ) -> jax.Array:
    """(alpha / rank) * a . b  [*in_shape, *out_shape] in fp32; with `rng` and dropout > 0 the
    input features of `a` are dropped (inverted dropout)."""
    a = adapter["a"].astype(jnp.float32)
    p = plan.cfg.dropout
    if rng is not None and p > 0:
        keep = jax.random.bernoulli(rng, 1.0 - p, target.in_shape)
        a = a * (keep.astype(jnp.float32) / (1.0 - p))[..., None]
    return plan.scale * jnp.tensordot(a, adapter["b"].astype(jnp.float32), axes=1)


def freeze(plan: LoraPlan, params: dict) -> dict:
    """The base as the step keeps it: `params` itself, or for QLoRA with each adapted kernel
    replaced by its quantized form (a `llm.compress.quantize.QArray`, contracting the kernel's
    input dims). Raises ConfigError for a group size that does not fit a kernel."""
    if plan.cfg.quant is None:
        return params
    for t in plan.targets:
        params = _set(params, t.path, quantize.quantize(
            _get(params, t.path), tuple(range(len(t.in_shape))), plan.cfg.quant,
            group_size=plan.cfg.group_size))
    return params


def base_kernel(plan: LoraPlan, target: Target, frozen: dict) -> jax.Array:
    """The base kernel as the adapted model sees it (QLoRA: dequantized), in its param dtype."""
    w = _get(frozen, target.path)
    if plan.cfg.quant is None:
        return w
    return quantize.dequantize(w, dtype=target.dtype)


def base_params(plan: LoraPlan, frozen: dict) -> dict:
    """The base model as full parameters (QLoRA: its kernels dequantized; no adapters): the
    reference policy of DPO / RLHF, without holding a second copy."""
    if plan.cfg.quant is None:
        return frozen
    for t in plan.targets:
        frozen = _set(frozen, t.path, base_kernel(plan, t, frozen))
    return frozen


def combine(plan: LoraPlan, adapters: dict, frozen: dict, rng: jax.Array | None = None) -> dict:
    """Full parameters for `transformer.apply`: base (dequantized) + (alpha/rank) * a . b on every
    target. rng: dropout key for training (None: no dropout). Pure; call it inside the loss so
    gradients reach only `adapters`."""
    params = frozen
    for p in plan.full:
        params = _set(params, p, _get(adapters, p))
    for i, t in enumerate(plan.targets):
        w = base_kernel(plan, t, frozen)
        key = None if rng is None else jax.random.fold_in(rng, i)
        d = delta(plan, t, _get(adapters, t.path), key)
        params = _set(params, t.path, (w.astype(jnp.float32) + d).astype(t.dtype))
    return params


def merge(plan: LoraPlan, adapters: dict, params: dict) -> dict:
    """params + delta on every target (a plain, unquantized base; `train_also` parameters
    replaced): the adapted model as ordinary parameters, for evaluation, serving and export.
    (For a QLoRA plan this adds the adapters to the unquantized base; `combine(plan, adapters,
    freeze(plan, params))` is the model as trained.)"""
    return combine(dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, quant=None)),
                   adapters, params)


def unmerge(plan: LoraPlan, adapters: dict, merged: dict) -> dict:
    """merged - delta on every target: the base back (up to float rounding; `train_also`
    parameters keep their trained values)."""
    for t in plan.targets:
        w = _get(merged, t.path)
        d = delta(plan, t, _get(adapters, t.path))
        merged = _set(merged, t.path, (w.astype(jnp.float32) - d).astype(t.dtype))
    return merged


def adapted_loss(plan: LoraPlan, loss_fn, seed: int):
    """(adapters, batch, frozen, step) -> sums: `loss_fn` (params, batch) -> sums on the combined
    parameters, with dropout keyed by (seed, step)."""

    def fn(adapters: dict, batch: dict, frozen: dict, step: jax.Array) -> dict:
        rng = None
        if plan.cfg.dropout > 0:
            rng = jax.random.fold_in(jax.random.key(seed), step)
        return loss_fn(combine(plan, adapters, frozen, rng), batch)

    return fn


def manifest_record(plan: LoraPlan, abstract_params: dict, base_run: str | None,
                    base_step: int | None, base_seed: int | None = None) -> dict:
    """The manifest.json "lora" entry of an adapter-only run: the settings, the adapted kernels
    and where the frozen base comes from (a run directory and step, or -- with no base run -- the
    seed its parameters were initialised from)."""
    return {"config": dataclasses.asdict(plan.cfg), "targets": [t.name for t in plan.targets],
            "train_also": ["/".join(p) for p in plan.full],
            "trainable_params": num_trainable(plan, abstract_params), "base_run": base_run,
            "base_step": base_step, "base_seed": base_seed}


def plan_from_record(record: dict, graphdef: nnx.GraphDef, abstract_params: dict,
                     logical_axes: dict) -> LoraPlan:
    """The plan a run trained with, from its manifest "lora" entry (`manifest_record`)."""
    plan = make_plan(graphdef, abstract_params, logical_axes, LoraConfig(**record["config"]))
    names = [t.name for t in plan.targets]
    if names != list(record["targets"]):
        raise ConfigError(f"the run's LoRA targets {record['targets']} do not match the model "
                          f"(its regex now selects {names}).")
    return plan
