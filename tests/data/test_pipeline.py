import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llm.data import pipeline, shards, sources
from llm.data import prepare as prepare_data
from llm.data.objectives import NEXT_TOKEN, Objective, shift_right
from tests.data import TINY_VOCAB, tiny_corpus

SEQ, BATCH = 64, 8

# A random post_pack (a random loss mask per row, like MLM's selection): its randomness must not
# depend on the process count or on restoring.
RANDOM_MASK = Objective(
    name="random_mask", lengths=NEXT_TOKEN.lengths,
    post_pack=lambda f, rng: {**NEXT_TOKEN.post_pack(f, rng),
                              "loss_mask": rng.integers(0, 2, SEQ).astype(np.float32)})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pipeline"))
    prepare_data.prepare(d, corpus_fn=tiny_corpus, vocab_size=TINY_VOCAB,
                         validation_fraction=0.25, num_shards=3)
    return d


def make(data_dir, split="train", **kw):
    args = dict(seq_len=SEQ, global_batch_size=BATCH, seed=0, objective=NEXT_TOKEN,
                process_index=0, process_count=1)
    return pipeline.make_dataset(data_dir, split, **{**args, **kw})


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def eval_pass(data_dir, **kw):
    return list(make(data_dir, "validation", shuffle=False, num_epochs=1, **kw))


def test_fields_shapes_dtypes(data_dir):
    (b,) = take(make(data_dir), 1)
    dtypes = dict(inputs=np.int32, targets=np.int32, loss_mask=np.float32, segment_ids=np.int32,
                  positions=np.int32)
    assert set(b) == set(dtypes)
    for k, dt in dtypes.items():
        assert b[k].shape == (BATCH, SEQ) and b[k].dtype == dt, k
    assert (b["targets"] < TINY_VOCAB).all() and (b["loss_mask"] == 1).all()  # packed full
    # process index / count default to jax's
    assert_batches_equal(take(make(data_dir, process_index=None, process_count=None), 2),
                         take(make(data_dir), 2))


def test_packing_matches_documents(data_dir):
    """One stream, no shuffle: the rows' tokens are the documents' tokens, in order, and
    segments / positions / inputs describe them."""
    info = shards.load_dataset_info(data_dir)
    docs = shards.read_all(info.shard_paths("validation"))
    batches = eval_pass(data_dir)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    mask = rows["segment_ids"] > 0
    np.testing.assert_array_equal(rows["loss_mask"], mask.astype(np.float32))
    np.testing.assert_array_equal(rows["targets"][mask], np.concatenate(docs))
    # Expected segmentation: documents laid end to end, cut every SEQ tokens.
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    pos_in_doc = np.concatenate([np.arange(len(d)) for d in docs])
    flat_seg = rows["segment_ids"][mask]
    flat_pos = rows["positions"][mask]
    row_start = np.arange(len(flat_seg)) % SEQ == 0
    new_segment = row_start | (np.diff(doc_of, prepend=-1) != 0)
    np.testing.assert_array_equal(row_start | (np.diff(flat_seg, prepend=0) != 0), new_segment)
    # positions restart at each segment start (a document continued in the next row restarts)
    starts = np.flatnonzero(new_segment)
    expected_pos = np.arange(len(flat_pos)) - np.repeat(starts, np.diff(np.append(starts,
                                                                                  len(flat_pos))))
    np.testing.assert_array_equal(flat_pos, expected_pos)
    assert (flat_pos <= pos_in_doc).all()
    for r in range(len(rows["targets"])):  # inputs are the per-segment shift-right of targets
        seg, tgt, inp = rows["segment_ids"][r], rows["targets"][r], rows["inputs"][r]
        np.testing.assert_array_equal(inp, shift_right(tgt, seg))
        inside = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
        np.testing.assert_array_equal(inp[1:][inside], tgt[:-1][inside])
        assert (inp[np.flatnonzero(np.diff(seg, prepend=0) != 0)] == 0).all()


def test_eval_pass_is_complete_and_padded(data_dir):
    info = shards.load_dataset_info(data_dir)
    for streams in (1, 2, 4):
        batches = eval_pass(data_dir, num_streams=streams)
        total = sum(float(b["loss_mask"].sum()) for b in batches)
        assert total == info.splits["validation"].num_tokens
        last = batches[-1]
        assert last["targets"].shape == (BATCH, SEQ)
        pad = last["segment_ids"] == 0
        assert pad.any() and (last["loss_mask"][pad] == 0).all()
        assert (last["inputs"][pad] == 0).all() and (last["targets"][pad] == 0).all()


def test_shuffle_is_seeded(data_dir):
    a = take(make(data_dir, seed=3), 4)
    assert_batches_equal(a, take(make(data_dir, seed=3), 4))
    b = take(make(data_dir, seed=4), 4)
    assert not all(np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, b))
    c = take(make(data_dir, seed=3, shuffle=False), 4)
    assert not all(np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, c))


def test_epochs_reshuffle_and_cover_everything(data_dir):
    info = shards.load_dataset_info(data_dir).splits["validation"]
    batches = list(make(data_dir, "validation", num_epochs=2, num_streams=2))
    assert sum(float(b["loss_mask"].sum()) for b in batches) == 2 * info.num_tokens


@pytest.mark.parametrize("streams,objective,window", [(1, NEXT_TOKEN, 1024),
                                                      (2, RANDOM_MASK, 1024),
                                                      (1, NEXT_TOKEN, 3)])
def test_state_restore_is_exact(data_dir, streams, objective, window):
    """window=3: restores land inside and across shuffle windows."""
    ds = make(data_dir, seed=7, num_streams=streams, objective=objective, shuffle_window=window)
    it = iter(ds)
    for skip in (0, 5, 1):  # the initial state (no packing remainder), then mid-document ones
        for _ in range(skip):
            next(it)
        # states must survive JSON: grain.checkpoint stores them as JSON
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(6)]
        restored = iter(ds)
        restored.set_state(state)
        assert_batches_equal([next(restored) for _ in range(6)], expected)
    # every intermediate state of a short finite pass restores exactly
    grain.experimental.assert_equal_output_after_checkpoint(
        make(data_dir, "validation", shuffle=False, num_epochs=1, num_streams=streams,
             global_batch_size=32))


def test_orbax_checkpoint_manager_round_trip(data_dir, tmp_path):
    ds = make(data_dir, seed=1, num_streams=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(4)]
    fresh = iter(ds)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        restored = mngr.restore(3, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored.data is fresh
    assert_batches_equal([next(fresh) for _ in range(4)], expected)


@pytest.mark.parametrize("split,kw", [("train", {}),
                                      ("train", dict(objective=RANDOM_MASK)),
                                      ("validation", dict(shuffle=False, num_epochs=1))])
def test_process_count_invariance(data_dir, split, kw):
    one = make(data_dir, split, num_streams=4, **kw)
    two = [make(data_dir, split, num_streams=4, process_index=p, process_count=2, **kw)
           for p in range(2)]
    four = [make(data_dir, split, num_streams=4, process_index=p, process_count=4, **kw)
            for p in range(4)]
    n = 6 if split == "train" else None
    ref = take(one, n) if n else list(one)
    for parts in (two, four):
        got = [take(p, n) if n else list(p) for p in parts]
        assert {len(g) for g in got} == {len(ref)}  # every process yields the same number
        for p_batches in got:
            assert p_batches[0]["targets"].shape == (BATCH // len(parts), SEQ)
        joined = [{k: np.concatenate([g[i][k] for g in got]) for k in ref[0]}
                  for i in range(len(ref))]
        assert_batches_equal(joined, ref)


def test_bad_arguments(data_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of make_dataset.num_streams"):
        make(data_dir, num_streams=3)
    with pytest.raises(ValueError, match="multiple of the process count"):
        make(data_dir, num_streams=2, process_count=4, process_index=0)
    with pytest.raises(ValueError, match="process_index"):
        make(data_dir, process_index=2, process_count=2)
    with pytest.raises(sources.DataError, match="fewer than num_streams"):
        make(data_dir, "validation", global_batch_size=64, num_streams=64)
    with pytest.raises(sources.DataError, match="no split"):
        make(data_dir, "test")
    with pytest.raises(sources.DataError, match=r"Run `python -m tools\.prepare_data"):
        make(str(tmp_path / "missing"))


def test_window_shuffle_permutes_rows_within_windows(data_dir):
    """Packing emits a long document as consecutive rows; the row shuffle reorders each window
    of packed rows (same rows, new order), so a batch is not one document's run of rows."""
    def rows(window, n):
        it = iter(make(data_dir, seed=3, shuffle_window=window))
        out = np.concatenate([next(it)["targets"] for _ in range(n // BATCH)])
        return [r.tobytes() for r in out]

    window = 4 * BATCH
    plain, shuffled = rows(1, window), rows(window, window)
    assert sorted(plain) == sorted(shuffled) and plain != shuffled
