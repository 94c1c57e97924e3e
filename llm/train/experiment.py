"""The run plumbing every pretraining experiment shares, in the order an experiment calls it.

An experiment module's `main` calls, top to bottom:

1. `parse_command_line`: --gin_file / --gin_param -> gin (checked), multi-process start-up;
2. its own run function, which decides *what* to train -- a `ModelSpec` (model, loss, cost) and
   an objective -- and how to summarise evaluation sums, and calls
   `prepare_on_one_process` (data) and then `train_and_evaluate`, which does the rest identically
   for all: mesh and rules, optimizer and sharded state, restore (model, optimizer, step and data
   iterator), manifest.json + config.gin, the training loop (`llm.train.loop`: metrics.jsonl,
   TensorBoard, checkpoints, SIGTERM), the final validation pass, eval.json and plots/loss.png;
3. `report_error` for the errors in `USER_ERRORS`: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from llm.config import ConfigError, parse_gin
from llm.data.objectives import Objective
from llm.data.pipeline import make_dataset
from llm.data.prepare import prepare
from llm.data.shards import DatasetInfo, load_dataset_info
from llm.data.sources import DataError
from llm.eval.perplexity import accumulate
from llm.parallel.mesh import initialize_distributed, make_mesh, mesh_shape
from llm.parallel.rules import axis_rules, logical_to_spec, tree_shardings
from llm.train import checkpoint, lora
from llm.train.loop import NonFiniteLoss, TrainConfig, to_global, train_loop
from llm.train.loss import LossFn
from llm.train.manifest import write_manifest
from llm.train.metrics import MetricsWriter, peak_flops, plot_loss
from llm.train.optimizer import make_optimizer
from llm.train.paths import run_path
from llm.train.state import TrainState, create_train_state
from llm.train.step import BATCH_AXES, batch_sharding, jit_eval_step, jit_train_step

# What a user can fix: bad settings, bad data, a diverged loss, unreadable checkpoints. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, NonFiniteLoss, checkpoint.CheckpointError)


def parse_command_line(name: str, description: str, argv: list[str] | None = None) -> None:
    """`python -m experiments.<name> [--gin_file=F ...] [--gin_param=B ...]`: parse and check the
    gin configuration, then start the multi-process runtime if one is configured."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}",
                                     description=description)
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file(s)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding(s)")
    args = parser.parse_args(argv)
    parse_gin(args.gin_file, args.gin_param)
    initialize_distributed()


def _prepared_elsewhere(data_dir: str) -> bool:
    """True for a data directory written by `seqio_tasks.seqio_to_dataset` (not from the
    configured corpus, so `prepare` must not rebuild it)."""
    from llm.data.seqio_tasks import PREPARED_BY

    try:
        return load_dataset_info(data_dir).settings.get("prepared_by") == PREPARED_BY
    except DataError:
        return False


def prepare_on_one_process(data_dir: str) -> DatasetInfo:
    """Process 0 prepares (or reuses) the data; the others wait, then read dataset.json.
    A directory exported from seqio (`seqio_to_dataset`) is used as it is."""
    if jax.process_index() == 0 and not _prepared_elsewhere(data_dir):
        prepare(data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_data")
    return load_dataset_info(data_dir)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is trained, independent of the mesh.

    graphdef / abstract_params / logical_axes: from `transformer.abstract(cfg, module)`.
    init: rng -> params (jitted into the final sharding).
    loss_fn: (params, batch) -> sums, see `llm.train.loss`.
    num_params: parameter count (manifest, console).
    flops_per_row: training FLOPs of one batch row (MFU).
    base_run / base_step: the run directory and checkpoint step `init` loads its parameters from
      (None: initialised from the seed); recorded for adapter-only (LoRA) runs.
    """

    graphdef: nnx.GraphDef
    abstract_params: dict
    logical_axes: dict
    init: Callable[[jax.Array], dict]
    loss_fn: LossFn
    num_params: int
    flops_per_row: float
    base_run: str | None = None
    base_step: int | None = None


@dataclasses.dataclass
class RunResult:
    """status: "completed" or "preempted" (SIGTERM: checkpointed, eval skipped).
    eval: the final validation record (also in eval.json), None when preempted.
    params: the model's full parameters (with LoRA: the base with the adapters applied, while
    state.params holds the adapters only)."""

    status: str
    state: TrainState
    eval: dict | None
    params: dict


def check_batch_fits_mesh(tc: TrainConfig, mesh, rules) -> None:
    """Raise ConfigError unless every micro-batch splits evenly over the mesh axes the rules put
    the batch on, and over the processes (instead of an IndivisibleError at the first step)."""
    spec = logical_to_spec(BATCH_AXES[:1], rules, mesh)
    axes = () if not spec or spec[0] is None else (
        (spec[0],) if isinstance(spec[0], str) else tuple(spec[0]))
    shards = math.prod(mesh.shape[a] for a in axes)
    shards = shards * jax.process_count() // math.gcd(shards, jax.process_count())
    micro = tc.global_batch_size // tc.accum_steps
    if micro % shards:
        per_step = f" / TrainConfig.accum_steps={tc.accum_steps} = {micro}" \
            if tc.accum_steps > 1 else ""
        raise ConfigError(
            f"TrainConfig.global_batch_size={tc.global_batch_size}{per_step} rows do not split "
            f"evenly over {shards} batch shards (mesh {mesh_shape(mesh)}, batch on "
            f"{' x '.join(axes) or 'no axis'}, {jax.process_count()} process(es)); set "
            f"TrainConfig.global_batch_size to a multiple of {shards * tc.accum_steps}.")


def train_and_evaluate(*, name: str, run_dir: str, data_dir: str, info: DatasetInfo,
                       tc: TrainConfig, model: ModelSpec, objective: Objective,
                       summarize_eval: Callable[[dict[str, float]], dict],
                       datasets: tuple | None = None, data_record: dict | None = None,
                       init_opt_state: Callable | None = None,
                       manifest_extra: dict | None = None) -> RunResult:
    """Train `model` on `objective` rows of `data_dir` into `run_dir`, resuming if it holds a
    checkpoint, then evaluate on the whole validation split.

    name: the experiment's name, prefixed to console lines.
    summarize_eval: summed eval-step outputs (nll, tokens, correct, ...) -> the eval record
      (used for intermediate passes and the final one, which gets `step` added).
    datasets: (train, validation) grain datasets to use instead of `make_dataset` on
      `data_dir` (SFT's chat rows); train is infinite and checkpointable, validation one finite
      pass. data_record: the manifest's data record in their place (needs vocab_size and
      tokenizer for `load_run`).
    init_opt_state: fresh optimizer state -> the one to start from (a base run's, restored by
      `llm.posttrain.init.restore_opt_state`); not called when the run resumes.
    manifest_extra: more manifest.json keys (e.g. the base run an SFT run started from).
    """
    mesh, rules = make_mesh(), axis_rules()
    check_batch_fits_mesh(tc, mesh, rules)
    tx, schedule = make_optimizer(total_steps=tc.steps)
    plan = lora.make_plan(model.graphdef, model.abstract_params, model.logical_axes)
    if plan is None:
        state, shardings = create_train_state(model.init, model.abstract_params,
                                              model.logical_axes, tx, mesh, rules, seed=tc.seed)
        train_step = jit_train_step(shardings, mesh, rules, loss_fn=model.loss_fn, tx=tx,
                                    schedule=schedule, accum_steps=tc.accum_steps)
        param_shardings, full_params = shardings.params, lambda state: state.params
    else:  # LoRA: the state holds the adapters; the frozen base is an argument of the step
        state, shardings, frozen, train_step, param_shardings, full_params = lora_setup(
            plan, model, tc, tx, schedule, mesh, rules)
    eval_step = jit_eval_step(param_shardings, mesh, rules, model.loss_fn)
    batch_shard = batch_sharding(mesh, rules)

    if datasets is not None:
        data_iter, validation = iter(datasets[0]), datasets[1]
    else:
        data_iter = iter(make_dataset(data_dir, "train", seq_len=tc.seq_len,
                                      global_batch_size=tc.global_batch_size, seed=tc.seed,
                                      objective=objective))
        # One finite, unshuffled pass; built once (building counts its batches, a full read),
        # then iterated afresh by every evaluation.
        validation = make_dataset(data_dir, "validation", seq_len=tc.seq_len,
                                  global_batch_size=tc.global_batch_size, seed=tc.seed,
                                  objective=objective, shuffle=False, num_epochs=1)
    manager = checkpoint.checkpoint_manager(str(run_path(run_dir) / "checkpoints"))
    restored = checkpoint.restore_latest(manager, state, data_iter)
    if restored is not None:
        state = restored
        print(f"{name}: resumed from step {int(state.step)} of {tc.steps}")
    elif init_opt_state is not None:
        state = state.replace(opt_state=init_opt_state(state.opt_state))

    def evaluate(state: TrainState, max_batches: int | None) -> dict:
        sums = accumulate(eval_step, full_params(state), validation,
                          lambda b: to_global(b, batch_shard), max_batches)
        return summarize_eval(sums)

    write_manifest(run_dir, mesh_shape=mesh_shape(mesh), seed=tc.seed,
                   data=data_record if data_record is not None else
                   {"data_dir": os.path.abspath(data_dir), **info.to_json()},
                   extra={"objective": objective.name, **(manifest_extra or {}),
                          "model": {"params": model.num_params,
                                    "flops_per_token": model.flops_per_row / tc.seq_len},
                          **({} if plan is None else {"lora": lora.manifest_record(
                              plan, model.abstract_params, model.base_run, model.base_step,
                              tc.seed if model.base_run is None else None)})})
    writer = MetricsWriter(run_dir)
    data_metrics = None
    if hasattr(data_iter, "mixture_proportions"):
        # `mixture/<domain>`: cumulative token shares of the domains seen so far (the iterator's
        # checkpointed counts right after the step's batch was drawn; process 0's rows).
        def data_metrics() -> dict[str, float]:
            return {f"mixture/{d or 'none'}": p
                    for d, p in data_iter.mixture_proportions().items()}
    peak, peak_source = peak_flops()
    print(f"{name}: {model.num_params / 1e6:.2f}M params, objective {objective.name}, mesh "
          f"{mesh_shape(mesh)}, peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source})")
    state, status = train_loop(
        cfg=tc, state=state, step_fn=train_step, data_iter=data_iter,
        batch_sharding=batch_shard, manager=manager, writer=writer,
        flops_per_step=model.flops_per_row * tc.global_batch_size,
        peak_flops_total=peak * jax.device_count(), evaluate=evaluate,
        data_metrics=data_metrics, profile_dir=str(run_path(run_dir) / "profile"))
    if hasattr(data_iter, "mixture_proportions"):
        shares = ", ".join(f"{d or '(none)'} {p:.3f}"
                           for d, p in data_iter.mixture_proportions().items())
        print(f"{name}: training tokens by domain: {shares}")
    if status == "preempted":
        print(f"{name}: stopped by signal at step {int(state.step)}; checkpoint written.")
        writer.close()
        return RunResult(status, state, None, full_params(state))

    result = {**evaluate(state, None), "step": int(state.step)}
    writer.write(int(state.step), result, prefix="eval")
    writer.close()
    if jax.process_index() == 0:
        (run_path(run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
        plot_loss(run_dir)
    return RunResult(status, state, result, full_params(state))


def lora_setup(plan: lora.LoraPlan, model: ModelSpec, tc: TrainConfig, tx, schedule, mesh,
                rules):
    """The LoRA form of the state and step (`llm.train.lora`): (state over the adapters only,
    its shardings, the frozen base (QLoRA: quantized), the jitted step, the full parameters'
    shardings, state -> full parameters)."""
    base_shardings = tree_shardings(model.logical_axes, model.abstract_params, mesh, rules)
    param_key, _ = jax.random.split(jax.random.key(tc.seed))  # as create_train_state's
    base = (jax.device_put(model.init(param_key), base_shardings)
            if getattr(model.init, "loads_params", False) else
            jax.jit(model.init, out_shardings=base_shardings)(param_key))
    frozen = jax.jit(functools.partial(lora.freeze, plan))(base)

    init_trainable = functools.partial(
        lambda base, key: lora.init_adapters(plan, jax.random.fold_in(key, 1), base), base)
    init_trainable.loads_params = True  # holds base arrays: placed, not jitted
    state, shardings = create_train_state(
        init_trainable, lora.abstract_adapters(plan, model.abstract_params),
        lora.adapter_axes(plan, model.logical_axes), tx, mesh, rules, seed=tc.seed)
    del base
    step = jit_train_step(shardings, mesh, rules,
                          frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen),
                          loss_fn=lora.adapted_loss(plan, model.loss_fn, tc.seed), tx=tx,
                          schedule=schedule, accum_steps=tc.accum_steps)
    combine = jax.jit(functools.partial(lora.combine, plan), out_shardings=base_shardings)
    names = ", ".join(t.name for t in plan.targets[:3]) + (", ..." if len(plan.targets) > 3
                                                           else "")
    trainable = lora.num_trainable(plan, model.abstract_params)
    print(f"lora: {len(plan.targets)} adapted kernels ({names}), rank {plan.cfg.rank}, "
          f"{trainable / 1e6:.3f}M trainable of {model.num_params / 1e6:.2f}M"
          f"{'' if plan.cfg.quant is None else f', base {plan.cfg.quant}'}")
    return (state, shardings, frozen, lambda s, b: step(s, b, frozen), base_shardings,
            lambda s: combine(s.params, frozen))


def report_error(name: str, error: BaseException) -> int:
    """Print `<name>: error: <first line>` on stderr and return the exit code, 2. (gin appends
    "In call to configurable ..." lines to errors raised inside configurables.)"""
    print(f"{name}: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
          file=sys.stderr)
    return 2
