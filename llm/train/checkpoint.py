"""Checkpoints: an orbax CheckpointManager holding the TrainState and the grain iterator state.

Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes into
a temporary directory and renames it when complete, so a process killed mid-write leaves the last
complete checkpoint as the latest one. Each process stores its own data-iterator position
(grain's format, `data/process_<i>-of-<n>.json`); a run restored on another process count
re-cuts the saved positions for its processes (`DataIteratorHandler`), so it continues with
the same global batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import sys
import time
from typing import Any

import gin
import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from llm.config import ConfigError
from llm.data.pipeline import reshard_iterator_states
from llm.train import paths
from llm.train.state import TrainState, abstract_state

log = logging.getLogger(__name__)


def process_index_and_count() -> tuple[int, int]:
    """(this process's index, the number of processes): whose data position is saved/restored."""
    return jax.process_index(), jax.process_count()


_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator checkpoint (one `process_<i>-of-<n>.json` per process, the same files),
    restorable on a different process count.

    On restore, a process whose own file is missing (the checkpoint was written by n processes,
    this run has another number) reads all n files and takes its part of the re-cut positions
    (`llm.data.pipeline.reshard_iterator_states`): the packing streams are concatenated in
    process order and cut anew. The global batches then continue token for token when the
    seed, `TrainConfig.global_batch_size` and `make_dataset.num_streams` are the same as in
    the saving run (they fix the streams and their rows); a stream count that this run's
    iterator does not have is a ConfigError naming the setting.
    """

    def save(self, directory: epath.Path, item=None, args=None) -> None:
        item = item or args.item
        index, count = process_index_and_count()
        state = item.get_state()  # a dict (grain datasets), or JSON bytes (grain's DataLoader)
        text = state.decode() if isinstance(state, bytes) else json.dumps(state, indent=4)
        (directory / f"process_{index}-of-{count}.json").write_text(text)

    def restore(self, directory: epath.Path, item=None, args=None):
        item = item or args.item
        index, count = process_index_and_count()
        own = directory / f"process_{index}-of-{count}.json"
        opaque = isinstance(item.get_state(), bytes)
        if own.exists():
            text = own.read_text()
            item.set_state(text.encode() if opaque else json.loads(text))
            item.start_prefetch()
            return item
        if opaque:
            raise ConfigError(f"the data position in {directory} was saved by another number of "
                              f"processes than this run's {count}, and this iterator "
                              f"({type(item).__name__}) cannot be re-cut; resume on the same "
                              "number of processes.")
        saved = {int(m.group(1)): int(m.group(2)) for f in directory.iterdir()
                 if (m := _PROCESS_FILE.fullmatch(f.name))}
        counts = set(saved.values())
        if len(counts) != 1 or sorted(saved) != list(range(next(iter(counts)))):
            raise ValueError(f"{directory} holds no complete set of data-iterator states "
                             f"(found {sorted(f.name for f in directory.iterdir())})")
        states = [json.loads((directory / f"process_{i}-of-{len(saved)}.json").read_text())
                  for i in range(len(saved))]
        expected = len(item.get_state().get("parents", []))
        streams = sum(len(s.get("parents", [])) for s in states)
        if all(set(s) == {"parents"} for s in states) and streams != expected * count:
            raise ConfigError(
                f"the checkpoint in {directory.parent} was written by {len(saved)} process(es) "
                f"with {streams} packing streams, but this run's data pipeline has {expected} "
                f"per process x {count} processes; set make_dataset.num_streams={streams} "
                "(and keep TrainConfig.global_batch_size) to resume on another process count.")
        item.set_state(reshard_iterator_states(states, count)[index])
        item.start_prefetch()
        log.info("data position of %d process(es) re-cut for %d", len(saved), count)
        return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


@gin.configurable
def checkpoint_manager(directory: str, save_every: int = 100, keep: int = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
    """A manager that saves every `save_every` steps and keeps the newest `keep` checkpoints
    (gin: checkpoint_manager.*). directory: local or a gs:// URI (`llm.train.paths`)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    paths.require_bucket_client(directory, "checkpoint_manager.directory")
    return ocp.CheckpointManager(paths.run_path(directory), options=options,
                                 item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, data_iter,
         force: bool = False) -> bool:
    """Start saving (asynchronously) if `step` is a save step or `force`. Returns whether it did."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataSave(data_iter))
    return manager.save(step, args=args, force=force)


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory can be restored; the message names the steps and the
    fix. (A corrupt latest checkpoint alone is not an error: `restore_latest` falls back.)"""


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def restore_latest(manager: ocp.CheckpointManager, state: TrainState, data_iter
                   ) -> TrainState | None:
    """Restore the newest readable checkpoint into `state`'s shardings and `data_iter` (in place;
    a data position saved by another number of processes is re-cut, see `DataIteratorHandler`).

    Returns the restored state, or None when the directory holds no checkpoint. A checkpoint
    that cannot be read (truncated, emptied, corrupted on disk) is moved to
    `<checkpoints>/../corrupt_checkpoints/<step>` with a warning on stderr, and the next older
    one is tried, so the run resumes from the previous good step and later saves the steps
    again. Raises CheckpointError when none can be read.
    """
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state(state)),
                data=DataRestore(data_iter)))
        except ConfigError:  # a setting that does not match the checkpoint: not damage
            raise
        except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
            failed.append((step, e))
            continue
        for bad, e in failed:
            moved = _move_aside(manager, bad)
            print(f"warning: checkpoint step {bad} in {manager.directory} cannot be read "
                  f"({_first_line(e)}); moved it to {moved} and resumed from step {step}.",
                  file=sys.stderr)
        if failed:
            manager.reload()
        log.info("restored checkpoint at step %d from %s", step, manager.directory)
        return restored["state"]
    if failed:
        step, e = failed[0]
        raise CheckpointError(
            f"no checkpoint in {manager.directory} can be restored (steps "
            f"{', '.join(str(s) for s, _ in failed)}; the latest, step {step}: {_first_line(e)}). "
            "If the model or optimizer settings changed since they were written, restore "
            "those settings; otherwise move the directory away to start from step 0.")
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Move an unreadable step directory out of the manager's view (kept for inspection)."""
    src = epath.Path(manager.directory) / str(step)
    dst_root = epath.Path(manager.directory).parent / "corrupt_checkpoints"
    dst_root.mkdir(parents=True, exist_ok=True)
    dst = dst_root / f"{step}-{int(time.time())}"
    src.rename(dst)
    return str(dst)


class StopSignal:
    """Turns SIGTERM (preemption, `kill`) into a flag the training loop polls between steps, so
    the loop can write a checkpoint and exit cleanly instead of dying mid-step."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
