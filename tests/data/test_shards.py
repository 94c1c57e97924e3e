import os

import grain
import numpy as np
import pytest

from llm.data import shards, sources


def _arrays(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2**31 - 1, size=int(rng.integers(1, 500)), dtype=np.int32)
            for _ in range(n)]


def test_write_read_round_trip_in_order(tmp_path):
    arrays = _arrays()
    paths = shards.write_shards(arrays, str(tmp_path), "train", 4)
    assert [os.path.basename(p) for p in paths] == [
        f"train-0000{k}-of-00004.array_record" for k in range(4)]
    source = shards.open_shards(paths)
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    assert len(source) == len(arrays)
    for a, b in zip(arrays, shards.read_all(paths)):
        assert b.dtype == np.int32
        np.testing.assert_array_equal(a, b)
    # works as a grain source, including random access
    ds = grain.MapDataset.source(source)
    np.testing.assert_array_equal(ds[17], arrays[17])
    assert not list(tmp_path.glob("*.tmp"))


def test_more_shards_than_documents_and_lists(tmp_path):
    paths = shards.write_shards([[1, 2], [3]], str(tmp_path), "v", 3)
    assert [r.tolist() for r in shards.read_all(paths)] == [[1, 2], [3]]


def _damage(path, how):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "truncate":
        data = data[:len(data) // 2]
    else:  # overwrite bytes inside the first chunk's data
        data[100:140] = b"\xff" * 40
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_corrupt_shard_is_a_clear_error(tmp_path, how):
    paths = shards.write_shards(_arrays(60), str(tmp_path), "train", 2)
    _damage(paths[1], how)
    with pytest.raises(sources.DataError) as e:
        shards.read_all(paths)  # truncation fails on open, overwriting on read
    msg = str(e.value)
    assert paths[1] in msg and "prepare_data" in msg and "--force" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_missing_shard(tmp_path):
    with pytest.raises(sources.DataError, match="does not exist.*prepare_data"):
        shards.open_shards([str(tmp_path / "train-00000-of-00001.array_record")])
    with pytest.raises(sources.DataError, match="prepare_data"):
        shards.open_shards([])


def test_missing_data_dir_names_prepare_data(tmp_path):
    with pytest.raises(sources.DataError, match=r"tools\.prepare_data --data_dir="):
        shards.load_dataset_info(str(tmp_path / "nothing_here"))
    (tmp_path / shards.DATASET_JSON).write_text("{not json")
    with pytest.raises(sources.DataError, match="unreadable"):
        shards.load_dataset_info(str(tmp_path))
