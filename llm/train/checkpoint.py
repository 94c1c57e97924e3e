"""Checkpoints: an orbax CheckpointManager holding the TrainState and the grain iterator state.

Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes into
a temporary directory and renames it when complete, so a process killed mid-write leaves the last
complete checkpoint as the latest one. Each process stores its own data-iterator position.
"""

from __future__ import annotations

import logging
import os
import signal

import gin
import grain
import orbax.checkpoint as ocp

from llm.train.state import TrainState, abstract_state

log = logging.getLogger(__name__)


@gin.configurable
def checkpoint_manager(directory: str, save_every: int = 100, keep: int = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
    """A manager that saves every `save_every` steps and keeps the newest `keep` checkpoints
    (gin: checkpoint_manager.*)."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, data_iter,
         force: bool = False) -> bool:
    """Start saving (asynchronously) if `step` is a save step or `force`. Returns whether it did."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter))
    return manager.save(step, args=args, force=force)


def restore_latest(manager: ocp.CheckpointManager, state: TrainState, data_iter
                   ) -> TrainState | None:
    """Restore the newest complete checkpoint into `state`'s shardings and `data_iter` (in place).

    Returns the restored state, or None when the directory holds no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state(state)),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    log.info("restored checkpoint at step %d from %s", step, manager.directory)
    return restored["state"]


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
