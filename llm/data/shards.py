"""Tokenized documents <-> ArrayRecord shards.

One record = one document's token ids (EOS included) as little-endian int32 bytes. Documents are
written to shards in order and contiguously (shard k holds documents [k*n/K, (k+1)*n/K)), so the
record index of `open_shards(paths)` is the document index. Shards are written with
`group_size:1` so any record is one random read (what grain's global shuffle needs).

Reading goes through `grain.sources.ArrayRecordDataSource`. Riegeli checksums every chunk, so a
truncated or overwritten shard is detected; `ShardSource` turns that into a `DataError` naming the
file and the fix instead of a library traceback.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import grain
import numpy as np
from array_record.python import array_record_module

from llm.data.sources import DataError

TOKEN_DTYPE = np.dtype("<i4")
WRITER_OPTIONS = "group_size:1"


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.array_record"


def write_shards(token_arrays: Iterable[np.ndarray | Sequence[int]], out_dir: str, prefix: str,
                 num_shards: int) -> list[str]:
    """Writes one record per token array into `num_shards` ArrayRecord files; returns the paths.

    `token_arrays` may be any iterable (it is materialized to split it evenly and in order).
    Files are written under temporary names and renamed at the end, so a crash never leaves a
    complete-looking shard behind.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    arrays = [np.asarray(a, dtype=TOKEN_DTYPE) for a in token_arrays]
    os.makedirs(out_dir, exist_ok=True)
    n = len(arrays)
    paths = []
    for k in range(num_shards):
        path = os.path.join(out_dir, shard_name(prefix, k, num_shards))
        tmp = path + ".tmp"
        writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
        for a in arrays[k * n // num_shards:(k + 1) * n // num_shards]:
            writer.write(a.tobytes())
        writer.close()
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _corrupt(path: str, what: str, e: Exception) -> DataError:
    return DataError(f"Shard {path} is corrupt or truncated ({what}: {type(e).__name__}: {e}). "
                     "Re-run `python -m tools.prepare_data "
                     "--data_dir=... --force` to rewrite the shards.")


class ShardSource(grain.sources.RandomAccessDataSource):
    """Random access over the records of several shards: `source[i]` -> int32 token array.

    One `grain.sources.ArrayRecordDataSource` per file (opened lazily by array_record), so an
    unreadable record is reported with the file that holds it.
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise DataError("No shard files given. Run `python -m tools.prepare_data "
                            "--data_dir=...` to create them.")
        self._sources = []
        for p in self.paths:
            if not os.path.isfile(p):
                raise DataError(f"Shard {p} does not exist. Run `python -m tools.prepare_data "
                                "--data_dir=...` to (re)create the data directory.")
            try:
                self._sources.append(grain.sources.ArrayRecordDataSource([p]))
            except Exception as e:  # array_record raises RuntimeError / ValueError / OSError
                raise _corrupt(p, "cannot open", e) from None
        self._starts = np.cumsum([0] + [len(s) for s in self._sources]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"Record {index} out of range [0, {len(self)}).")
        k = bisect.bisect_right(self._starts, index) - 1
        try:
            record = self._sources[k][index - self._starts[k]]
        except Exception as e:
            raise _corrupt(self.paths[k], f"reading record {index - self._starts[k]}", e) from None
        if len(record) % TOKEN_DTYPE.itemsize:
            raise _corrupt(self.paths[k], f"record {index - self._starts[k]}",
                           ValueError(f"{len(record)} bytes is not a multiple of 4"))
        return np.frombuffer(record, dtype=TOKEN_DTYPE)

    def __repr__(self) -> str:
        return f"ShardSource({len(self.paths)} files, {len(self)} records)"


def open_shards(paths: Sequence[str]) -> ShardSource:
    """A grain random-access source over the shards (DataError if any is missing or corrupt)."""
    return ShardSource(paths)


def read_all(paths: Sequence[str]) -> list[np.ndarray]:
    """Every record of the shards, in order (checks every chunk; used by tests and tools)."""
    source = open_shards(paths)
    return [source[i] for i in range(len(source))]


DATASET_JSON = "dataset.json"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One split of a prepared dataset.

    num_tokens counts every token written, the EOS closing each document included (so it equals
    the number of targets an evaluation pass scores). num_bytes is the UTF-8 size of the
    documents' text: bits per byte = total loss in bits / num_bytes. gzip_bytes is
    `gzip -9` of the same text concatenated (validation only), for a baseline bits per byte;
    unigram_bits is the split's total loss in bits under the train split's unigram token
    frequencies (validation only): the floor a model must beat to have learned anything.
    `prepare` writes shards per domain, so the split's shards are its domains' shards in sorted
    domain order, and gzip_bytes is the sum over its shards (each compressed on its own).
    """

    num_documents: int
    num_tokens: int
    num_bytes: int
    shards: list[str]  # relative to the data directory
    gzip_bytes: int | None = None
    unigram_bits: float | None = None
    # {domain: {num_documents, num_tokens, num_bytes, shards}}; "" is "no domain". None for
    # directories written before domains existed (one domain: all shards).
    domains: dict | None = None

    def domain_shards(self) -> dict[str, list[str]]:
        """{domain: its shard files}: the components `make_dataset.mixture` mixes."""
        if not self.domains:
            return {"": list(self.shards)}
        return {d: list(v["shards"]) for d, v in self.domains.items()}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Contents of `<data_dir>/dataset.json`, written by `tools/prepare_data.py`."""

    fingerprint: str
    vocab_size: int
    tokenizer: str  # relative to the data directory
    splits: dict[str, SplitInfo]
    settings: dict
    data_dir: str = dataclasses.field(default="", compare=False)

    def shard_paths(self, split: str) -> list[str]:
        return [os.path.join(self.data_dir, p) for p in self.splits[split].shards]

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.data_dir, self.tokenizer)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        del d["data_dir"]
        return d

    def save(self) -> str:
        path = os.path.join(self.data_dir, DATASET_JSON)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
        return path


def load_dataset_info(data_dir: str) -> DatasetInfo:
    """Reads `<data_dir>/dataset.json`; DataError telling how to create it if it is missing."""
    path = os.path.join(data_dir, DATASET_JSON)
    if not os.path.isfile(path):
        raise DataError(f"No prepared dataset in {data_dir!r} ({DATASET_JSON} is missing). Run "
                        f"`python -m tools.prepare_data --data_dir={data_dir}` first.")
    try:
        with open(path) as f:
            d = json.load(f)
        d["splits"] = {k: SplitInfo(**v) for k, v in d["splits"].items()}
        return DatasetInfo(**d, data_dir=data_dir)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}). Re-run "
                        f"`python -m tools.prepare_data --data_dir={data_dir} --force`.") from None
