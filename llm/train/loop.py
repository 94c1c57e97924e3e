"""The training loop shared by every experiment: step, log, evaluate, checkpoint, resume.

The loop owns no model or objective knowledge; an experiment hands it a jitted step function, an
iterator of host batches, and an evaluation function.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Iterator

import gin
import jax
import numpy as np
from jax.sharding import NamedSharding
from tqdm import tqdm

from llm.config import ConfigError
from llm.train import checkpoint
from llm.train.host_memory import release_free_memory
from llm.train.metrics import MetricsWriter
from llm.train.state import TrainState


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train for how long (gin: TrainConfig.*).

    steps: total optimizer steps (a resumed run continues up to this number).
    global_batch_size: rows per optimizer step, over all processes and micro-batches.
    accum_steps: micro-batches per step (gradient accumulation).
    log_every: steps between console/TensorBoard lines (metrics.jsonl gets every step).
    eval_every: steps between validation passes (0: only at the end).
    eval_batches: validation batches per intermediate pass (the final pass reads everything).
    fault_injection: testing hook, "sigkill_after_save:N" or "sigkill_during_save:N" kills the
      process with SIGKILL right after the checkpoint of step N is committed / started.
    profile_steps: (first, last) steps, 1-based and inclusive, traced with `jax.profiler` into
      <run_dir>/profile (open in TensorBoard's profile tab or ui.perfetto.dev). Skip step 1:
      it includes compilation.
    loss_chunk: decoder loss head in chunks of this many positions (`llm.train.loss.
      chunked_cross_entropy`: the [batch, seq, vocab] logits are never held whole, and their
      gradient is formed chunk by chunk in the forward: the same matmuls, no recomputation);
      0 computes the logits at once. The default 128 keeps the logits a small part of the
      step's memory (gpt2_tiny at 4096 tokens: XLA temporaries 775 -> 563 MiB at seq 1024).
    """

    steps: int = 1000
    global_batch_size: int = 16
    seq_len: int = 256
    accum_steps: int = 1
    seed: int = 0
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    fault_injection: str | None = None
    profile_steps: tuple[int, int] | None = None
    loss_chunk: int = 128

    def __post_init__(self):
        for field in ("steps", "global_batch_size", "seq_len", "accum_steps", "log_every"):
            if getattr(self, field) < 1:
                raise ConfigError(f"TrainConfig.{field}={getattr(self, field)} must be >= 1.")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ConfigError(f"TrainConfig.eval_every={self.eval_every} must be >= 0 (0: only "
                              f"at the end) and TrainConfig.eval_batches={self.eval_batches} "
                              ">= 1.")
        if self.loss_chunk < 0:
            raise ConfigError(f"TrainConfig.loss_chunk={self.loss_chunk} must be >= 0 (0: "
                              "unchunked loss head).")
        if self.global_batch_size % self.accum_steps:
            raise ConfigError(f"TrainConfig.global_batch_size={self.global_batch_size} is not "
                              f"divisible by TrainConfig.accum_steps={self.accum_steps}; make "
                              "the batch a multiple of accum_steps.")
        if self.profile_steps is not None and (
                len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0]
                <= self.profile_steps[1]):
            raise ConfigError(f"TrainConfig.profile_steps={self.profile_steps!r} must be "
                              "(first, last) steps with 1 <= first <= last, e.g. (10, 12).")
        if self.fault_injection is not None:
            kind, _, at = self.fault_injection.partition(":")
            if kind not in ("sigkill_after_save", "sigkill_during_save") or not at.isdigit():
                raise ConfigError(f"TrainConfig.fault_injection={self.fault_injection!r} is not "
                                  "'sigkill_after_save:N' or 'sigkill_during_save:N'.")


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays laid out by `sharding` (one process: a device_put)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or inf; the message names the step and what to change."""


def _fault(cfg: TrainConfig, kind: str, step: int, manager) -> None:
    if not cfg.fault_injection:
        return
    name, _, at = cfg.fault_injection.partition(":")
    if name == kind and int(at) == step:
        if kind == "sigkill_after_save":
            manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)


def train_loop(*, cfg: TrainConfig, state: TrainState, step_fn: Callable,
               data_iter: Iterator[dict[str, np.ndarray]], batch_sharding: NamedSharding,
               manager, writer: MetricsWriter, flops_per_step: float, peak_flops_total: float,
               evaluate: Callable[[TrainState, int | None], dict] | None = None,
               data_metrics: Callable[[], dict[str, float]] | None = None,
               profile_dir: str | None = None) -> tuple[TrainState, str]:
    """Run from `state.step` to `cfg.steps`. Returns (state, status) where status is
    "completed" or "preempted" (SIGTERM: a checkpoint was written, the caller exits 0).

    data_iter: the checkpointable iterator of host batches (this process's rows); its state is
    saved with every checkpoint.
    data_metrics: host-side figures of the data read so far (e.g. mixture shares), called right
    after each step's batch is drawn and written into that step's metrics record.
    profile_dir: where the `cfg.profile_steps` trace goes.
    """
    stop = checkpoint.StopSignal()
    start = int(state.step)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    pending = None  # metrics of the previous step, fetched after the next step is dispatched
    last_time = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    status = "completed"
    log_args = (writer, bar, cfg, tokens_per_step, flops_per_step, peak_flops_total)
    first, last = cfg.profile_steps or (0, -1)
    tracing = False
    try:
        for step in range(start, cfg.steps):
            if step + 1 == first and profile_dir is not None:
                jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
                tracing = True
            batch = to_global(next(data_iter), batch_sharding)
            if step == start:
                step_fn = _compile(step_fn, state, batch)
            host = data_metrics() if data_metrics is not None else {}
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, metrics = step_fn(state, batch)
            if tracing and step + 1 == last:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                tracing = False
            if pending is not None:
                last_time = _log(pending, *log_args, last_time)
            pending = (step + 1, metrics, host)
            if manager.should_save(step + 1):
                # Record this step's metrics before its checkpoint, so a crash right after the
                # save never leaves steps that are in the checkpoint but not in metrics.jsonl.
                last_time, pending = _log(pending, *log_args, last_time), None
                checkpoint.save(manager, step + 1, state, data_iter)
                _fault(cfg, "sigkill_during_save", step + 1, manager)
                _fault(cfg, "sigkill_after_save", step + 1, manager)
            if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 \
                    and step + 1 < cfg.steps:
                writer.write(step + 1, evaluate(state, cfg.eval_batches), prefix="eval")
            if _stop_agreed(stop):
                status = "preempted"
                break
        if pending is not None:
            _log(pending, *log_args, last_time)
        manager.wait_until_finished()
        if int(state.step) > start and int(state.step) not in manager.all_steps():
            checkpoint.save(manager, int(state.step), state, data_iter, force=True)
            manager.wait_until_finished()
    finally:
        if tracing:
            jax.profiler.stop_trace()
        bar.close()
        stop.restore()
    return state, status


def _compile(step_fn: Callable, state: TrainState, batch: dict) -> Callable:
    """The jitted step compiled for this (state, batch) ahead of its first call, and then the
    compiler's freed scratch memory handed back to the OS (`release_free_memory`), so that it
    does not sit under the step's own peak. A step_fn that is not a jitted function (LoRA's
    closure, tests' fakes) compiles on its first call as before."""
    lower = getattr(step_fn, "lower", None)
    if lower is not None:
        step_fn = lower(state, batch).compile()
    release_free_memory()
    return step_fn


def _stop_agreed(stop: checkpoint.StopSignal) -> bool:
    """Whether any process has received SIGTERM. With several processes this is a collective
    that every process calls after every step, so all of them see the same answer after the same
    step: a maintenance event that signals one host stops all hosts at one step, and they write
    one checkpoint together."""
    local = stop.received is not None
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([local], np.int32))))


def _log(pending, writer, bar, cfg, tokens_per_step, flops_per_step, peak_flops_total,
         last_time) -> float:
    step, metrics, host = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    dt = max(now - last_time, 1e-9)
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLoss(
            f"Loss became {metrics['loss']} at step {step} (grad_norm {metrics['grad_norm']}). "
            "The run stopped without checkpointing this state; lower the learning rate "
            "(learning_rate_schedule.peak), enable clipping (make_optimizer.clip_norm) or "
            "z-loss (TrainConfig.z_loss), then resume from the last checkpoint.")
    metrics.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                   mfu=flops_per_step / dt / peak_flops_total, **host)
    writer.write(step, metrics)
    bar.update(1)
    if step % cfg.log_every == 0 or step == cfg.steps:
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                        mfu=f"{metrics['mfu']:.1%}")
    return now
