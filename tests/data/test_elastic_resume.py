"""Elastic data resume: an input position saved by 2 processes continues on 1 process (and vice
versa) with the same global batches, token for token. What must stay the same: the seed, the
global batch size and make_dataset.num_streams (the streams and their rows); the process count
may change. Checked on the re-cutting function and through a real orbax checkpoint restored
by `restore_latest` (each simulated process saves its own `process_<i>-of-<n>.json`)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm.config import ConfigError
from llm.data.pipeline import make_dataset, reshard_iterator_states
from llm.train import checkpoint
from llm.train.state import TrainState

SEQ, GLOBAL, STREAMS, DONE, NEXT = 64, 8, 2, 3, 5


def iterators(data_dir: str, processes: int) -> list:
    return [iter(make_dataset(data_dir, "train", seq_len=SEQ, global_batch_size=GLOBAL, seed=7,
                              num_streams=STREAMS, process_index=p, process_count=processes))
            for p in range(processes)]


def global_batches(its: list, n: int) -> list[np.ndarray]:
    """The next n global batches of token ids: the processes' rows concatenated in order."""
    return [np.concatenate([next(it)["targets"] for it in its]) for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_data) -> list[np.ndarray]:
    """Global batches DONE+1 .. DONE+NEXT of one uninterrupted single-process pass."""
    return global_batches(iterators(tiny_data, 1), DONE + NEXT)[DONE:]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_other_process_count_gives_same_tokens(tiny_data, reference, before, after):
    its = iterators(tiny_data, before)
    global_batches(its, DONE)
    saved = [it.get_state() for it in its]  # what each process checkpoints
    resumed = iterators(tiny_data, after)
    for it, state in zip(resumed, reshard_iterator_states(saved, after)):
        it.set_state(state)
    got = global_batches(resumed, NEXT)
    assert all(b.shape == (GLOBAL, SEQ) for b in got)
    for a, b in zip(got, reference):
        np.testing.assert_array_equal(a, b)
    # Not vacuous: the batches differ from each other and from the ones already consumed.
    assert not np.array_equal(got[0], got[1])
    first = global_batches(iterators(tiny_data, 1), 1)[0]
    assert not np.array_equal(got[0], first)


def test_streams_must_split_over_processes(tiny_data):
    its = iterators(tiny_data, 2)
    with pytest.raises(ConfigError, match="num_streams"):
        reshard_iterator_states([it.get_state() for it in its], 3)


def _state(step: int) -> TrainState:
    params = {"w": jnp.arange(4.0)}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state=optax.sgd(0.1).init(params))


def _as_process(monkeypatch, index: int, count: int) -> None:
    monkeypatch.setattr(checkpoint, "process_index_and_count", lambda: (index, count))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_restore_latest_recuts_the_data_position(tiny_data, reference, tmp_path, monkeypatch,
                                                 before, after):
    """A checkpoint written by `before` processes, restored by `after` processes through
    `restore_latest`: the next NEXT global batches equal the uninterrupted run's."""
    its = iterators(tiny_data, before)
    global_batches(its, DONE)
    manager = checkpoint.checkpoint_manager(str(tmp_path / "ckpt"), async_save=False)
    _as_process(monkeypatch, 0, before)  # process 0 saves through the manager ...
    checkpoint.save(manager, DONE, _state(DONE), its[0], force=True)
    manager.wait_until_finished()
    data_dir = tmp_path / "ckpt" / str(DONE) / "data"
    for p in range(1, before):  # ... and every other process writes its own file beside it
        _as_process(monkeypatch, p, before)
        checkpoint.DataIteratorHandler().save(data_dir, args=checkpoint.DataSave(its[p]))
    assert sorted(f.name for f in data_dir.glob("process_*")) == [
        f"process_{p}-of-{before}.json" for p in range(before)]

    resumed = iterators(tiny_data, after)
    for p, it in enumerate(resumed):
        _as_process(monkeypatch, p, after)
        manager = checkpoint.checkpoint_manager(str(tmp_path / "ckpt"))
        state = checkpoint.restore_latest(manager, _state(0), it)
        assert int(state.step) == DONE
    got = global_batches(resumed, NEXT)
    for a, b in zip(got, reference):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_restore_with_other_stream_count_names_the_setting(tiny_data, tmp_path, monkeypatch):
    """num_streams left at its default (the process count) changes with the process count:
    a clear error naming make_dataset.num_streams, and the checkpoint is not moved aside."""
    it = iter(make_dataset(tiny_data, "train", seq_len=SEQ, global_batch_size=GLOBAL, seed=7,
                           process_index=0, process_count=1))  # 1 stream
    next(it)
    manager = checkpoint.checkpoint_manager(str(tmp_path / "ckpt"), async_save=False)
    _as_process(monkeypatch, 0, 1)
    checkpoint.save(manager, 1, _state(1), it, force=True)
    manager.wait_until_finished()
    other = iter(make_dataset(tiny_data, "train", seq_len=SEQ, global_batch_size=GLOBAL, seed=7,
                              num_streams=4, process_index=0, process_count=2))  # 2 streams
    _as_process(monkeypatch, 0, 2)
    with pytest.raises(ConfigError, match=r"make_dataset.num_streams=1"):
        checkpoint.restore_latest(checkpoint.checkpoint_manager(str(tmp_path / "ckpt")),
                                  _state(0), other)
    assert (tmp_path / "ckpt" / "1").exists()
