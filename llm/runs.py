"""Open a finished (or running) training run directory for inference: config, params, tokenizer.

    run = load_run("runs/quickstart")            # latest checkpoint, params on the default device
    run = load_run("runs/quickstart", step=600, mesh=make_mesh(), rules=axis_rules())
    logits = transformer.apply(run.graphdef, run.params, ids)

A run directory (`llm.train.experiment.train_and_evaluate`) holds manifest.json (the data record,
with the data directory and its tokenizer), config.gin (the operative gin config the run trained
with) and checkpoints/<step>/ (orbax; item `state` is the TrainState). The model config is rebuilt
from the `ModelConfig.*` bindings of config.gin plus the vocabulary size of the data record, the
way `experiments.pretrain_ntp` built it. Only the parameters are read from the checkpoint (no
optimizer state), directly into the shardings the logical-axis rules give them on `mesh`.

Evaluation, serving, fine-tuning and review all open runs through this one function.

A LoRA run (manifest.json has a "lora" entry, `llm.train.lora`) checkpoints only its adapters;
`load_run` loads the base it names (a run directory and step, or the seed it was initialised
from), applies the adapters and returns the merged parameters, so nothing downstream needs to
know about LoRA.

A compressed checkpoint (`experiments.compress` writes `<out>/compress/<method>/checkpoint/`
with compress.json beside the packed params, `llm.compress.checkpoint`) opens through the same
function: pass that directory, or its parent `<out>/compress/<method>/`. The config and tokenizer
come from the source run the record names; quantized weights come back as `QArray` leaves, which
dequantize inside the jitted forward, so the sampler, the evaluator and the serving engine run
them unchanged; `LoadedRun.compression` holds the record.
"""

from __future__ import annotations

import dataclasses
import json
import os

import gin
import gin.config_parser
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llm.config import ConfigError
from llm.data.sources import DataError
from llm.data.tokenizer import Tokenizer, load_tokenizer
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.rules import Rules, tree_shardings

# Objectives whose runs are decoder-only models (`llm.data.objectives`).
DECODER_OBJECTIVES = ("next_token", "prefix_lm", "sft",  # "sft": experiments/sft.py
                      "rlhf")  # "rlhf": experiments/rlhf.py (DPO, PPO, GRPO)


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run's model, ready for inference.

    cfg: the ModelConfig it trained with. graphdef/params: `transformer.apply(graphdef, params,
    ...)`; params is a plain nested dict of arrays (placed on `mesh` when one was given).
    tokenizer: the run's SentencePiece tokenizer. step: the checkpoint's step. manifest: the
    parsed manifest.json. seq_len: the training sequence length (TrainConfig.seq_len), the
    context the model has learned to use. compression: the compress.json record of a
    compressed checkpoint (method, source_run, step, quantized weights), else None; run_dir is
    then the compressed checkpoint's directory.
    """

    run_dir: str
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: dict
    tokenizer: Tokenizer
    step: int
    manifest: dict
    seq_len: int
    compression: dict | None = None

    @property
    def name(self) -> str:
        """The run directory's name; for a compressed checkpoint <source run>-<method>."""
        if self.compression is not None:
            source = os.path.basename(os.path.normpath(self.compression["source_run"]))
            return f"{source}-{self.compression['method'].replace(':', 'of')}"
        return os.path.basename(os.path.normpath(self.run_dir))


def gin_bindings(text: str, source: str = "config.gin") -> dict[str, dict[str, object]]:
    """{configurable name: {parameter: value}} of the unscoped bindings in a gin config text.

    Parsed with gin's own parser (literals evaluated) without touching the global gin config, so
    it is safe inside another program (lm-eval, a server). References (`@fn`, `%MACRO`) are not
    resolved; they are returned as gin's reference objects.
    """
    out: dict[str, dict[str, object]] = {}
    try:
        parser = gin.config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True))
        for statement in parser:
            if isinstance(statement, gin.config_parser.BindingStatement) and not statement.scope:
                name = statement.selector.split(".")[-1]
                out.setdefault(name, {})[statement.arg_name] = statement.value
    except (SyntaxError, ValueError) as e:
        raise ConfigError(f"{source} cannot be parsed ({e}); it was written by the training run "
                          "and should not be edited by hand.") from None
    return out


def _model_config(bindings: dict[str, dict[str, object]], vocab_size: int, source: str
                  ) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {}
    for key, value in bindings.get("ModelConfig", {}).items():
        if key not in fields:
            raise ConfigError(f"{source} binds ModelConfig.{key}, which this version of the code "
                              f"does not have (valid: {', '.join(sorted(fields))}).")
        if isinstance(value, (gin.config.ConfigurableReference,
                              gin.config._UnknownConfigurableReference)):
            raise ConfigError(f"{source} binds ModelConfig.{key} to a reference ({value}); "
                              "load_run reads literal values only.")
        kwargs[key] = value
    kwargs["vocab_size"] = vocab_size
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def checkpoint_steps(run_dir: str) -> list[int]:
    """The complete checkpoints of a run, oldest first (orbax's own listing)."""
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    if not os.path.isdir(directory):
        return []
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def read_run_config(run_dir: str) -> tuple[dict, ModelConfig, int, str]:
    """(manifest, ModelConfig, training seq_len, tokenizer path) of a decoder-only run.

    Raises DataError when `run_dir` is not a run directory and ConfigError for a run of another
    model family (encoder / encoder-decoder) or an unreadable config.
    """
    manifest_path = os.path.join(run_dir, "manifest.json")
    gin_path = os.path.join(run_dir, "config.gin")
    if not os.path.isdir(run_dir):
        raise DataError(f"run_dir {run_dir!r} does not exist; pass the directory a training run "
                        "wrote (runs/<name>/ with manifest.json and checkpoints/).")
    if not (os.path.isfile(manifest_path) and os.path.isfile(gin_path)):
        raise DataError(f"run_dir {run_dir!r} is not a run directory (manifest.json or "
                        "config.gin missing); pass the directory a training run wrote "
                        "(runs/<name>/).")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{manifest_path} cannot be read ({e}).") from None
    objective = manifest.get("objective", "next_token")
    if objective not in DECODER_OBJECTIVES:
        raise ConfigError(f"run_dir {run_dir!r} trained objective {objective!r} (an encoder or "
                          "encoder-decoder model); evaluation and serving support decoder-only "
                          f"runs ({', '.join(DECODER_OBJECTIVES)}).")
    with open(gin_path) as f:
        bindings = gin_bindings(f.read(), gin_path)
    data = manifest.get("data") or {}
    if "vocab_size" not in data or "tokenizer" not in data:
        raise DataError(f"{manifest_path} has no data record (vocab_size, tokenizer); it was not "
                        "written by a pretraining run.")
    cfg = _model_config(bindings, int(data["vocab_size"]), gin_path)
    seq_len = int(bindings.get("TrainConfig", {}).get("seq_len", 1024))
    tok_path = tokenizer_path(run_dir, data)
    return manifest, cfg, seq_len, tok_path


def tokenizer_path(run_dir: str, data: dict) -> str:
    """The tokenizer the run trained with: a copy in the run directory if there is one, else the
    one in the data directory the manifest names."""
    local = os.path.join(run_dir, os.path.basename(data["tokenizer"]))
    if os.path.isfile(local):
        return local
    path = os.path.join(data.get("data_dir", ""), data["tokenizer"])
    if not os.path.isfile(path):
        raise DataError(f"the tokenizer of run {run_dir!r} is missing: {path!r} (from "
                        "manifest.json data.data_dir) does not exist. Copy the data directory's "
                        f"{data['tokenizer']} into the run directory.")
    return path


def load_run(run_dir: str, step: int | None = None, mesh: Mesh | None = None,
             rules: Rules | None = None) -> LoadedRun:
    """Load a decoder-only run: config, tokenizer and the params of checkpoint `step` (default:
    the newest complete one).

    With `mesh` (and `rules`, default the run's own axis_rules.rules from config.gin) the params
    are restored straight into their logical-axis shardings, as in training; without, onto the
    default device. Raises DataError for a directory that is not a run, has no checkpoint, or
    lacks `step`; ConfigError for a non-decoder run.

    A compressed checkpoint directory (see the module docstring) is detected by its
    compress.json; `step`, if given, must be the step it was compressed from.
    """
    run_dir = os.path.abspath(run_dir)
    compressed = compressed_checkpoint(run_dir)
    if compressed is not None:
        return _load_compressed(compressed, step, mesh, rules)
    manifest, cfg, seq_len, tok_path = read_run_config(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise DataError(f"run_dir {run_dir!r} has no checkpoint (checkpoints/ is empty or "
                        "missing); train it first or wait for its first save.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise DataError(f"run_dir {run_dir!r} has no checkpoint at step {step}; available steps: "
                        f"{', '.join(map(str, steps))}.")
    graphdef, abstract_params, logical_axes = transformer.abstract(cfg)
    if mesh is None:
        mesh = Mesh(jax.devices()[:1], ("data",))
        rules = ()
    if rules is None:
        rules = run_axis_rules(run_dir)
    shardings = tree_shardings(logical_axes, abstract_params, mesh, rules)
    if manifest.get("lora"):
        params = _lora_params(run_dir, step, manifest["lora"], cfg, mesh, rules, shardings)
    else:
        params = restore_params(run_dir, step, abstract_params, shardings)
    return LoadedRun(run_dir=run_dir, cfg=cfg, graphdef=graphdef, params=params,
                     tokenizer=load_tokenizer(tok_path), step=int(step),
                     manifest=manifest, seq_len=seq_len)


def run_axis_rules(run_dir: str) -> Rules:
    """The logical-axis rules (`axis_rules.rules`) a run trained with, from its config.gin."""
    with open(os.path.join(run_dir, "config.gin")) as f:
        return tuple((n, tuple(t) if isinstance(t, list) else t) for n, t in
                     gin_bindings(f.read()).get("axis_rules", {}).get("rules", ()))


def compressed_checkpoint(path: str) -> str | None:
    """The compressed checkpoint at `path` -- `path` itself when it holds compress.json, or
    `path`/checkpoint (`experiments.compress`'s compress/<method>/ directory) -- else None."""
    for candidate in (path, os.path.join(path, "checkpoint")):
        if os.path.isfile(os.path.join(candidate, "compress.json")):
            return candidate
    return None


def _load_compressed(path: str, step: int | None, mesh: Mesh | None, rules: Rules | None
                     ) -> LoadedRun:
    """A compressed checkpoint: the source run's config and tokenizer, the stored params (QArray
    leaves where quantized). On a mesh, float params go to their logical-axis shardings and the
    packed codes and scales are replicated (their [K/2, N] layout has no logical axes)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from llm.compress import quantize as Q
    from llm.compress.checkpoint import load_compressed, read_record

    record = read_record(path)
    where = f"compressed checkpoint {path!r}"
    for key in ("method", "source_run", "step", "quantized"):
        if key not in record:
            raise DataError(f"{where}: compress.json has no {key!r}; it was not written by "
                            "experiments.compress (llm.compress.checkpoint.save_compressed).")
    if step is not None and step != record["step"]:
        raise DataError(f"{where} was compressed from step {record['step']} of "
                        f"{record['source_run']!r}, not step {step}; drop the step argument.")
    try:
        manifest, cfg, seq_len, tok_path = read_run_config(record["source_run"])
    except (DataError, ConfigError) as e:
        raise DataError(f"{where}: its source run cannot be read: {e}") from None
    graphdef, abstract_params, logical_axes = transformer.abstract(cfg)
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                   abstract_params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): a.shape
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)}
    for name, meta in record["quantized"].items():
        if tuple(meta.get("shape", ())) != tuple(flat.get(name, ())):
            raise DataError(f"{where} does not match the model of its source run "
                            f"{record['source_run']!r}: weight {name!r} is stored with shape "
                            f"{tuple(meta.get('shape', ()))}, the source's config.gin gives "
                            f"{flat.get(name, 'no such weight')}.")
    params, _ = load_compressed(path, abstract_params)
    if mesh is not None:
        if rules is None:
            rules = run_axis_rules(record["source_run"])
        shardings = tree_shardings(logical_axes, abstract_params, mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        params = jax.tree.map(
            lambda p, s: (jax.device_put(p, replicated) if Q.is_qarray(p) else
                          jax.device_put(p, s)), params, shardings, is_leaf=Q.is_qarray)
    return LoadedRun(run_dir=path, cfg=cfg, graphdef=graphdef, params=params,
                     tokenizer=load_tokenizer(tok_path), step=int(record["step"]),
                     manifest=manifest, seq_len=seq_len, compression=record)


def _lora_params(run_dir: str, step: int, record: dict, cfg: ModelConfig, mesh: Mesh,
                 rules: Rules, shardings: dict) -> dict:
    """The merged parameters of an adapter-only LoRA run: its base (with the vocabulary rows SFT
    appended, if any; QLoRA: quantized as in training) plus its checkpointed adapters."""
    from llm.train import lora

    graphdef, abstract_params, logical_axes = transformer.abstract(cfg)
    plan = lora.plan_from_record(record, graphdef, abstract_params, logical_axes)
    if record.get("base_run"):
        base_run = load_run(record["base_run"], record.get("base_step"), mesh, rules)
        base = base_run.params
        extra = cfg.vocab_size - base_run.cfg.vocab_size
        if extra > 0:
            from llm.posttrain.init import extend_params

            base = extend_params(base, extra)
        if jax.tree.map(lambda x: x.shape, base) != jax.tree.map(lambda x: x.shape,
                                                                 abstract_params):
            raise DataError(f"the LoRA base {record['base_run']!r} of run {run_dir!r} does not "
                            "have the run's model shape; it was changed after the run.")
        base = jax.device_put(base, shardings)
    else:  # the base was initialised from a seed, as `create_train_state` does
        key, _ = jax.random.split(jax.random.key(int(record["base_seed"])))
        base = jax.jit(lambda k: transformer.init(cfg, k)[1], out_shardings=shardings)(key)
    trainable = lora.abstract_adapters(plan, abstract_params)
    adapters = restore_params(run_dir, step, trainable, tree_shardings(
        lora.adapter_axes(plan, logical_axes), trainable, mesh, rules))
    return jax.jit(lambda a, b: lora.combine(plan, a, lora.freeze(plan, b)),
                   out_shardings=shardings)(adapters, base)


def restore_state_field(run_dir: str, step: int, field: str, target, mismatch) -> object:
    """Only `state.<field>` of checkpoint `step` (e.g. "params", "opt_state"), each array
    restored straight into the sharding of the matching leaf of `target` (a pytree of arrays or
    `jax.ShapeDtypeStruct`s with shardings). A checkpoint whose structure or shapes differ raises
    `mismatch(first line of orbax's message)`, an exception naming what to change."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          target)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"),
                                    item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={field: target}, restore_args={field: restore_args}, partial_restore=True)))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise mismatch(f"{type(e).__name__}: {first}") from None
    finally:
        manager.close()
    return restored["state"][field]


def restore_params(run_dir: str, step: int, abstract_params: dict, shardings: dict) -> dict:
    """Only `state.params` of a checkpoint, each array straight into its sharding."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, shardings)
    return restore_state_field(run_dir, step, "params", target, lambda why: DataError(
        f"checkpoint {step} of {run_dir!r} does not match the model in its config.gin ({why})."))
