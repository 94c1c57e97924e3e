"""Elastic data resume: an input position saved by 2 processes continues on 1 process (and vice
versa) with the same global batches, token for token. What must stay the same: the seed, the
global batch size and make_dataset.num_streams (the streams and their rows); the process count
may change."""

import numpy as np
import pytest

from llm.config import ConfigError
from llm.data.pipeline import make_dataset, reshard_iterator_states

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
