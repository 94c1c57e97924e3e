"""Offline distillation data: the teacher's top-k logits, written once to ArrayRecord beside the
tokens of the rows the student will train on, and read back through grain.

    write_topk(out_dir, teacher, data_dir, k=64, seq_len=512, global_batch_size=8, seed=0,
               num_batches=600)                  # the teacher forward, once
    ds = topk_dataset(out_dir, global_batch_size=8)   # grain.IterDataset of training batches

The rows are the training batches `llm.data.pipeline.make_dataset(data_dir, "train", seq_len,
global_batch_size, seed)` yields, in order, so an offline run sees exactly the batches the online
run with the same seed sees (and with k = vocabulary size, exactly its loss). One record per row:

    inputs, targets, segment_ids, positions   int32   [seq]
    loss_mask                                 float32 [seq]
    topk_values                               float32 [seq, k]   the teacher's k largest logits
    topk_indices                              uint16 [seq, k] (int32 when vocab > 65536)

Storage per token: 20 + k * (4 + 2) bytes (k = 64: 404 bytes; k = 8: 68), against 4 bytes for
the token alone and vocab * 4 bytes for full logits (1024: 4096 bytes). `topk.json` records the
layout, the teacher (run, step) and the data settings; a directory written for other settings
is refused, never silently reused.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from llm.config import ConfigError
from llm.data.curate.local import atomic_write
from llm.data.pipeline import make_dataset
from llm.data.shards import WRITER_OPTIONS
from llm.data.sources import DataError
from llm.model import transformer

META = "topk.json"
ROW_FIELDS = (("inputs", "<i4"), ("targets", "<i4"), ("segment_ids", "<i4"),
              ("positions", "<i4"), ("loss_mask", "<f4"))


def index_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 65536 else "<i4"


def bytes_per_token(k: int, vocab_size: int) -> int:
    """Storage of one token of an offline row: the row fields plus k values and k indices."""
    return sum(np.dtype(d).itemsize for _, d in ROW_FIELDS) + k * (
        4 + np.dtype(index_dtype(vocab_size)).itemsize)


def _layout(seq_len: int, k: int, vocab_size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return ([(name, d, (seq_len,)) for name, d in ROW_FIELDS]
            + [("topk_values", "<f4", (seq_len, k)),
               ("topk_indices", index_dtype(vocab_size), (seq_len, k))])


def encode_row(row: dict[str, np.ndarray], layout) -> bytes:
    return b"".join(np.ascontiguousarray(row[name], dtype=d).reshape(shape).tobytes()
                    for name, d, shape in layout)


def decode_row(record: bytes, layout) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, d, shape in layout:
        n = int(np.prod(shape)) * np.dtype(d).itemsize
        out[name] = np.frombuffer(record, dtype=d, count=int(np.prod(shape)),
                                  offset=offset).reshape(shape)
        offset += n
    if offset != len(record):
        raise DataError(f"an offline top-k record has {len(record)} bytes, the layout in "
                        f"{META} needs {offset}; rewrite the directory.")
    # Fixed dtypes for the step (indices as int32), whatever the storage width.
    out["topk_indices"] = out["topk_indices"].astype(np.int32)
    return out


def settings(teacher_run: str, teacher_step: int, data_dir: str, fingerprint: str, *, k: int,
             seq_len: int, global_batch_size: int, seed: int, num_batches: int,
             vocab_size: int) -> dict:
    """The record of what a top-k directory holds (compared on reuse)."""
    return {"teacher_run": os.path.abspath(teacher_run), "teacher_step": int(teacher_step),
            "data_dir": os.path.abspath(data_dir), "data_fingerprint": fingerprint, "k": int(k),
            "seq_len": int(seq_len), "global_batch_size": int(global_batch_size),
            "seed": int(seed), "num_batches": int(num_batches), "vocab_size": int(vocab_size),
            "index_dtype": index_dtype(vocab_size),
            "bytes_per_token": bytes_per_token(k, vocab_size)}


def read_settings(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_reusable(out_dir: str, want: dict) -> bool:
    """True when `out_dir` holds top-k data for exactly `want` (or for more batches); False when
    it holds none; ConfigError naming the first differing setting otherwise."""
    have = read_settings(out_dir)
    if have is None:
        return False
    for key, value in want.items():
        ok = have.get(key) >= value if key == "num_batches" else have.get(key) == value
        if not ok:
            raise ConfigError(
                f"distill.topk_dir={out_dir!r} holds teacher top-k data written with {key}="
                f"{have.get(key)!r}, this run needs {value!r}; remove the directory or set "
                "distill.topk_dir to a new one.")
    return True


def make_topk_fn(graphdef, k: int):
    """Jitted (teacher params, inputs, positions, segment_ids) -> (values, indices) [b, s, k]."""

    @jax.jit
    def topk(params, inputs, positions, segment_ids):
        logits = transformer.apply(graphdef, params, inputs, positions=positions,
                                   segment_ids=segment_ids)
        values, indices = jax.lax.top_k(logits, k)
        return values.astype(jnp.float32), indices.astype(jnp.int32)

    return topk


def write_topk(out_dir: str, *, graphdef, params: dict, meta: dict) -> str:
    """Run the teacher over `meta["num_batches"]` training batches (settings in `meta`, see
    `settings`) and write one record per row to `<out_dir>/topk-00000-of-00001.array_record`,
    then `topk.json`. Written under a temporary name, so an interrupted write leaves nothing
    that looks complete."""
    os.makedirs(out_dir, exist_ok=True)
    layout = _layout(meta["seq_len"], meta["k"], meta["vocab_size"])
    batches = iter(make_dataset(meta["data_dir"], "train", seq_len=meta["seq_len"],
                                global_batch_size=meta["global_batch_size"], seed=meta["seed"],
                                process_index=0, process_count=1))
    topk = make_topk_fn(graphdef, meta["k"])
    path = os.path.join(out_dir, "topk-00000-of-00001.array_record")
    writer = array_record_module.ArrayRecordWriter(path + ".tmp", WRITER_OPTIONS)
    for _ in tqdm(range(meta["num_batches"]), desc="teacher top-k", unit="batch",
                  disable=jax.process_index() != 0):
        batch = next(batches)
        values, indices = jax.device_get(topk(params, batch["inputs"], batch["positions"],
                                              batch["segment_ids"]))
        for r in range(len(batch["inputs"])):
            row = {name: batch[name][r] for name, _ in ROW_FIELDS}
            row.update(topk_values=values[r], topk_indices=indices[r])
            writer.write(encode_row(row, layout))
    writer.close()
    os.replace(path + ".tmp", path)
    atomic_write(os.path.join(out_dir, META),
                 json.dumps({**meta, "files": [os.path.basename(path)]}, indent=2).encode())
    return path


class TopKSource(grain.sources.RandomAccessDataSource):
    """Random access over the rows of a top-k directory: `source[i]` -> the row's fields."""

    def __init__(self, out_dir: str):
        meta = read_settings(out_dir)
        if meta is None:
            raise DataError(f"{out_dir} holds no teacher top-k data ({META} missing); run "
                            "experiments.distill with distill.mode='offline' to write it.")
        self.meta = meta
        self.layout = _layout(meta["seq_len"], meta["k"], meta["vocab_size"])
        self._source = grain.sources.ArrayRecordDataSource(
            [os.path.join(out_dir, f) for f in meta["files"]])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        return decode_row(self._source[int(index)], self.layout)


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def topk_dataset(out_dir: str, *, global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """Batches [global_batch_size // process_count, ...] of this process's rows, in the order
    they were written, repeating after the last batch. The iterator's state (checkpointed with
    the run) is its position."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    source = TopKSource(out_dir)
    if source.meta["global_batch_size"] != global_batch_size:
        raise ConfigError(f"{out_dir} was written for TrainConfig.global_batch_size="
                          f"{source.meta['global_batch_size']}, this run has {global_batch_size}.")
    rows = global_batch_size // process_count
    num_batches = len(source) // global_batch_size

    def batch(i: int) -> dict[str, np.ndarray]:
        first = int(i) * global_batch_size + process_index * rows
        return _stack([source[j] for j in range(first, first + rows)])

    return grain.MapDataset.range(num_batches).repeat(None).map(batch).to_iter_dataset()
