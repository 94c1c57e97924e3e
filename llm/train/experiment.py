"""The run plumbing every pretraining experiment shares.

An experiment decides *what* to train -- a `ModelSpec` (model, loss, cost) and an objective --
and how to summarise evaluation sums. `train_and_evaluate` does the rest, identically for all:
mesh and rules, optimizer and sharded state, restore (model, optimizer, step, RNG and data
iterator), manifest.json + config.gin, the training loop (metrics.jsonl, TensorBoard, checkpoints,
SIGTERM), the final validation pass, eval.json and plots/loss.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from llm.parallel.rules import axis_rules
from llm.train import checkpoint
from llm.train.loop import NonFiniteLoss, TrainConfig, to_global, train_loop
from llm.train.manifest import write_manifest
from llm.train.metrics import MetricsWriter, peak_flops, plot_loss
from llm.train.optimizer import make_optimizer
from llm.train.state import TrainState, create_train_state
from llm.train.step import LossFn, batch_sharding, jit_eval_step, jit_train_step


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


class _MixtureMetrics:
    """With a data mixture (`make_dataset.mixture`): adds `mixture/<domain>`, the cumulative token
    shares of the domains training has seen (the data iterator's checkpointed counts right after
    the step's batch was drawn; process 0's rows), to every train record of metrics.jsonl."""

    def __init__(self, writer: MetricsWriter, data_iter, step: int):
        self._writer, self._it, self._step, self._seen = writer, data_iter, step, {}

    def batches(self):
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                return
            self._step += 1
            self._seen[self._step] = self._it.mixture_proportions()
            yield batch

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if prefix == "train" and step in self._seen:
            shares = self._seen.pop(step)
            metrics = {**metrics, **{f"mixture/{d or 'none'}": p for d, p in shares.items()}}
        self._writer.write(step, metrics, prefix)

    def __getattr__(self, name):
        return getattr(self._writer, name)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is trained, independent of the mesh.

    graphdef / abstract_params / logical_axes: from `transformer.abstract(cfg, module)`.
    init: rng -> params (jitted into the final sharding).
    loss_fn: (params, batch) -> sums, see `llm.train.step`.
    num_params: parameter count (manifest, console).
    flops_per_row: training FLOPs of one batch row (MFU).
    """

    graphdef: nnx.GraphDef
    abstract_params: dict
    logical_axes: dict
    init: Callable[[jax.Array], dict]
    loss_fn: LossFn
    num_params: int
    flops_per_row: float


@dataclasses.dataclass
class RunResult:
    """status: "completed" or "preempted" (SIGTERM: checkpointed, eval skipped).
    eval: the final validation record (also in eval.json), None when preempted."""

    status: str
    state: TrainState
    eval: dict | None


def train_and_evaluate(*, name: str, run_dir: str, data_dir: str, info: DatasetInfo,
                       tc: TrainConfig, model: ModelSpec, objective: Objective,
                       summarize_eval: Callable[[dict[str, float]], dict]) -> RunResult:
    """Train `model` on `objective` rows of `data_dir` into `run_dir`, resuming if it holds a
    checkpoint, then evaluate on the whole validation split.

    name: the experiment's name, prefixed to console lines.
    summarize_eval: summed eval-step outputs (nll, tokens, correct, ...) -> the eval record
      (used for intermediate passes and the final one, which gets `step` added).
    """
    mesh, rules = make_mesh(), axis_rules()
    tx, schedule = make_optimizer(total_steps=tc.steps)
    state, shardings = create_train_state(model.init, model.abstract_params, model.logical_axes,
                                          tx, mesh, rules, seed=tc.seed)
    train_step = jit_train_step(shardings, mesh, rules, loss_fn=model.loss_fn, tx=tx,
                                schedule=schedule, accum_steps=tc.accum_steps)
    eval_step = jit_eval_step(shardings.params, mesh, rules, model.loss_fn)
    batch_shard = batch_sharding(mesh, rules)

    data_iter = iter(make_dataset(data_dir, "train", seq_len=tc.seq_len,
                                  global_batch_size=tc.global_batch_size, seed=tc.seed,
                                  objective=objective))
    manager = checkpoint.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    restored = checkpoint.restore_latest(manager, state, data_iter)
    if restored is not None:
        state = restored
        print(f"{name}: resumed from step {int(state.step)} of {tc.steps}")

    def evaluate(state: TrainState, max_batches: int | None) -> dict:
        batches = make_dataset(data_dir, "validation", seq_len=tc.seq_len,
                               global_batch_size=tc.global_batch_size, seed=tc.seed,
                               objective=objective, shuffle=False, num_epochs=1)
        sums = accumulate(eval_step, state.params, batches,
                          lambda b: to_global(b, batch_shard), max_batches)
        return summarize_eval(sums)

    write_manifest(run_dir, mesh_shape=mesh_shape(mesh), seed=tc.seed,
                   data={"data_dir": os.path.abspath(data_dir), **info.to_json()},
                   extra={"objective": objective.name,
                          "model": {"params": model.num_params,
                                    "flops_per_token": model.flops_per_row / tc.seq_len}})
    writer = MetricsWriter(run_dir)
    batches, log = data_iter, writer
    if hasattr(data_iter, "mixture_proportions"):
        mixture = _MixtureMetrics(writer, data_iter, int(state.step))
        batches, log = mixture.batches(), mixture
    peak, peak_source = peak_flops()
    print(f"{name}: {model.num_params / 1e6:.2f}M params, objective {objective.name}, mesh "
          f"{mesh_shape(mesh)}, peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source})")
    state, status = train_loop(
        cfg=tc, state=state, step_fn=train_step, batches=batches, data_iter=data_iter,
        batch_sharding=batch_shard, manager=manager, writer=log,
        flops_per_step=model.flops_per_row * tc.global_batch_size,
        peak_flops_total=peak * jax.device_count(), evaluate=evaluate)
    if hasattr(data_iter, "mixture_proportions"):
        shares = ", ".join(f"{d or '(none)'} {p:.3f}"
                           for d, p in data_iter.mixture_proportions().items())
        print(f"{name}: training tokens by domain: {shares}")
    if status == "preempted":
        print(f"{name}: stopped by signal at step {int(state.step)}; checkpoint written.")
        writer.close()
        return RunResult(status, state, None)

    result = {**evaluate(state, None), "step": int(state.step)}
    writer.write(int(state.step), result, prefix="eval")
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot_loss(run_dir)
    return RunResult(status, state, result)


def main(name: str, description: str, run: Callable[[], object],
         argv: list[str] | None = None) -> int:
    """An experiment's command line: `--gin_file`/`--gin_param`, multi-process start-up, then
    `run()`. Bad configuration or data and a diverged loss print one clear line and return 2."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}",
                                     description=description)
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file(s)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding(s)")
    args = parser.parse_args(argv)
    try:
        parse_gin(args.gin_file, args.gin_param)
        initialize_distributed()
        run()
    except (ConfigError, DataError, NonFiniteLoss) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0
