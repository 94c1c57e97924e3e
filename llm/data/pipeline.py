"""grain input pipeline: shards -> shuffle -> pack -> objective -> batch -> this process's slice.

`make_dataset` returns a `grain.IterDataset`; `iter(ds)` has `get_state()/set_state()` (JSON
state, saved by the trainer with `grain.checkpoint.CheckpointSave` inside its orbax
CheckpointManager), and restoring reproduces the following batches exactly.

Order of operations (per split):

1. `ShardSource` records (one document's tokens + EOS each) as a `grain.MapDataset`;
2. global shuffle with an explicit seed, reshuffled every epoch (`shuffle(seed).repeat(n)`:
   grain derives epoch e's permutation from seed + e);
3. streams: stream s takes the documents whose shuffled index % num_streams == s. Each stream is
   packed, transformed by `objective.post_pack` and batched to `global_batch_size // num_streams`
   rows on its own;
4. process p owns streams [p*S/P, (p+1)*S/P) and concatenates their batches along the batch axis
   in stream order. The global batch (processes concatenated in order) therefore does not depend
   on the process count for a fixed `num_streams`.

Packing uses `grain.experimental.ConcatThenSplitIterDataset`: documents are concatenated and cut
into rows of exactly `objective.lengths(seq_len)`, long documents continuing in the next row as a
new segment (positions restart at 0). No token is dropped and no row is padded except at the very
end of a finite pass, which is what both pretraining (no wasted compute) and evaluation (every
token scored exactly once) want. First-fit packing would keep short documents whole but pads
rows and, for documents longer than a row, needs truncation -- losing tokens, which breaks the
evaluation guarantee and bits-per-byte.

Mixtures (`mixture`, as seqio mixtures): the documents of several domains of the split (written
per domain by `prepare`) are mixed before step 3 by `grain.MapDataset.mix`, each domain shuffled
and repeated on its own. Rates are shares of *tokens*: a domain's document weight is its rate
divided by its mean document length, so documents are drawn in a fixed, deterministic interleave
and token shares match the rates up to document-length noise. `mixture_temperature` T instead
rates every domain by (its tokens)^(1/T) (T=1: proportional, large T: uniform). The mixture is a
`MapDataset`, so streams, process-count invariance and exact resume are unchanged. Every row
carries its tokens per domain through packing; the returned iterator sums them (in its
checkpointed state) as `mixture_tokens` / `mixture_proportions()`: what training actually saw.
Mixtures apply to infinite passes only; a finite pass (evaluation) reads the split whole. Other
prepared directories with the same tokenizer (`prepare.tokenizer_model`) join a mixture as whole
components (`mixture_datasets={name: data_dir}`).

Finite passes (`num_epochs` set, e.g. evaluation with `shuffle=False, num_epochs=1`): every stream
is padded to the same number of batches -- the partial last batch with pad rows
(`segment_ids == 0`, `loss_mask == 0`) and then whole pad batches -- so every process yields the
same number of batches (collectives stay in step) and every token appears exactly once.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import gin
import grain
import numpy as np

from llm.config import ConfigError
from llm.data import shards
from llm.data.objectives import NEXT_TOKEN, Objective
from llm.data.sources import DataError

# Threads that read records ahead, per stream. Reading a record is a local random read
# (~10 us); a few threads keep ConcatThenSplit fed.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _as_features(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """A document's record as the objective's input: {'targets': tokens + EOS}."""
    return {"targets": tokens}


def _zero_packed(lengths: dict[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for name, n in lengths.items():
        for key in (name, f"{name}_segment_ids", f"{name}_positions"):
            out[key] = np.zeros(n, np.int32)
    return out


def pad_row(objective: Objective, seq_len: int) -> dict[str, np.ndarray]:
    """The row used for padding: `post_pack` of an all-padding packed row (segment 0)."""
    return objective.post_pack(_zero_packed(objective.lengths(seq_len)), np.random.default_rng(0))


class _PadBatchesIterDataset(grain.IterDataset):
    """Pads a batched stream: the partial last batch to `rows`, then pad batches up to
    `num_batches` (None: pass through, the stream is infinite)."""

    def __init__(self, parent: grain.IterDataset, *, rows: int, num_batches: int | None,
                 pad: dict[str, np.ndarray]):
        super().__init__(parent)
        self._rows, self._num_batches, self._pad = rows, num_batches, pad

    def __iter__(self):
        return _PadBatchesIterator(self._parent.__iter__(), self._rows, self._num_batches,
                                   self._pad)


class _PadBatchesIterator(grain.DatasetIterator):

    def __init__(self, parent, rows, num_batches, pad):
        super().__init__(parent)
        self._rows, self._num_batches, self._pad = rows, num_batches, pad
        self._count = 0

    def __next__(self):
        if self._num_batches is not None and self._count >= self._num_batches:
            raise StopIteration
        try:
            batch = next(self._parent)
        except StopIteration:
            if self._num_batches is None:
                raise
            batch = {k: np.zeros((0, *v.shape), v.dtype) for k, v in self._pad.items()}
        missing = self._rows - len(next(iter(batch.values())))
        if missing:
            batch = {k: np.concatenate([v, np.broadcast_to(self._pad[k], (missing,
                                                                          *self._pad[k].shape))])
                     for k, v in batch.items()}
        self._count += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "count": self._count}

    def set_state(self, state: dict[str, Any]):
        self._parent.set_state(state["parent"])
        self._count = state["count"]


class _JsonSafePackIterDataset(grain.IterDataset):
    """ConcatThenSplit whose state survives a JSON round trip (grain.checkpoint stores JSON).

    grain's packer stores remainder slices as tuples and compares them with the tuple `(-1, -1)`;
    after JSON they come back as lists and would read as "has a remainder". This converts them
    back on `set_state`.
    """

    def __init__(self, parent: grain.IterDataset, lengths: dict[str, int]):
        super().__init__(parent)
        self._packed = grain.experimental.ConcatThenSplitIterDataset(parent,
                                                                     length_struct=lengths)

    def __iter__(self):
        return _JsonSafePackIterator(self._packed.__iter__())


class _JsonSafePackIterator(grain.DatasetIterator):

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        state = dict(state)
        state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state(state)


MIXTURE_TOKENS = "mixture_tokens"  # per row: [num_domains] tokens of each domain in the row
_DOMAIN = "_mixture_domain"  # per document, then per token through packing


class _MixtureReportIterDataset(grain.IterDataset):
    """Removes `MIXTURE_TOKENS` from every batch and sums it into the iterator's state."""

    def __init__(self, parent: grain.IterDataset, names: list[str]):
        super().__init__(parent)
        self._names = names

    def __iter__(self):
        return _MixtureReportIterator(self._parent.__iter__(), self._names)


class _MixtureReportIterator(grain.DatasetIterator):

    def __init__(self, parent, names):
        super().__init__(parent)
        self.mixture_names = list(names)
        self.mixture_tokens = np.zeros(len(names), np.int64)

    def __next__(self):
        batch = dict(next(self._parent))
        self.mixture_tokens += batch.pop(MIXTURE_TOKENS).sum(axis=0)
        return batch

    def mixture_proportions(self) -> dict[str, float]:
        """Share of each domain among the (non-padding) tokens yielded so far."""
        total = max(int(self.mixture_tokens.sum()), 1)
        return {n: int(c) / total for n, c in zip(self.mixture_names, self.mixture_tokens)}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "tokens": self.mixture_tokens.tolist()}

    def set_state(self, state: dict[str, Any]):
        self._parent.set_state(state["parent"])
        self.mixture_tokens = np.asarray(state["tokens"], np.int64)


def mixture_components(data_dir: str, split: str, datasets: dict[str, str] | None = None
                       ) -> dict[str, dict]:
    """What a mixture can draw from: {name: {num_documents, num_tokens, paths}}.

    The domains of `data_dir`'s split (named as in dataset.json; "" for documents without one),
    plus the whole split of each other prepared directory in `datasets` ({name: data_dir}), which
    must use the same tokenizer (same `tokenizer.model` bytes).
    """
    info = shards.load_dataset_info(data_dir)
    s = info.splits[split]
    out = {}
    for d, paths in s.domain_shards().items():
        stats = s.domains[d] if s.domains else {"num_tokens": s.num_tokens,
                                                "num_documents": s.num_documents}
        out[d] = {"num_documents": stats["num_documents"], "num_tokens": stats["num_tokens"],
                  "paths": [os.path.join(data_dir, p) for p in paths]}
    for name, other_dir in (datasets or {}).items():
        if name in out:
            raise DataError(f"make_dataset.mixture_datasets name {name!r} is also a domain of "
                            f"{data_dir}; choose another name.")
        other = shards.load_dataset_info(other_dir)
        if split not in other.splits:
            raise DataError(f"{other_dir} (make_dataset.mixture_datasets[{name!r}]) has no "
                            f"split {split!r}.")
        if _file_hash(other.tokenizer_path) != _file_hash(info.tokenizer_path):
            raise DataError(f"{other_dir} (make_dataset.mixture_datasets[{name!r}]) was prepared "
                            f"with another tokenizer than {data_dir}; prepare it with "
                            f"`prepare.tokenizer_model='{info.tokenizer_path}'`.")
        o = other.splits[split]
        out[name] = {"num_documents": o.num_documents, "num_tokens": o.num_tokens,
                     "paths": other.shard_paths(split)}
    return out


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mixture_rates(components: dict[str, dict], mixture: dict[str, float] | None,
                  temperature: float | None) -> dict[str, float]:
    """Token rates per component (summing to 1) from explicit `mixture` rates or a
    temperature: rate proportional to (component tokens)^(1/T)."""
    if mixture is not None and temperature is not None:
        raise ConfigError("Set make_dataset.mixture (rates) or make_dataset.mixture_temperature, "
                          "not both.")
    if temperature is not None:
        if temperature <= 0:
            raise ConfigError(f"make_dataset.mixture_temperature={temperature} must be > 0.")
        mixture = {d: v["num_tokens"] ** (1.0 / temperature) for d, v in components.items()}
    unknown = sorted(set(mixture) - set(components))
    if unknown:
        raise DataError(f"make_dataset.mixture names {unknown}, which are not among the "
                        f"domains and datasets {sorted(components)} (prepare writes the domains "
                        "of `prepare.domain_field`; other prepared directories are named in "
                        "`make_dataset.mixture_datasets`).")
    bad = {d: r for d, r in mixture.items() if not (isinstance(r, (int, float)) and r > 0)}
    if bad:
        raise ConfigError(f"make_dataset.mixture rates must be > 0, got {bad}; leave a domain "
                          "out to exclude it.")
    total = sum(mixture.values())
    return {d: mixture[d] / total for d in sorted(mixture)}


def _mixed_documents(components: dict[str, dict], rates: dict[str, float], seed: int
                     ) -> grain.MapDataset:
    """The components' documents, each shuffled and repeated forever, mixed by `rates` of
    tokens; every document carries its component index under `_DOMAIN`."""
    parts, weights = [], []
    for i, d in enumerate(rates):
        c = components[d]
        docs = grain.MapDataset.source(shards.open_shards(c["paths"]))
        docs = docs.shuffle(seed=_derived_seed(seed, 0, 1000 + i))
        parts.append(docs.repeat(None).map(lambda t, i=i: {"targets": t, _DOMAIN: np.int32(i)}))
        weights.append(rates[d] * c["num_documents"] / max(c["num_tokens"], 1))
    return grain.MapDataset.mix(parts, weights)


def _with_domain(key: str):
    """Tag each token of feature `key` with the document's domain (packed alongside it)."""

    def fn(f: dict) -> dict:
        return {**f, _DOMAIN: np.full(len(f[key]), f[_DOMAIN], np.int32)}

    return fn


def _count_domains(post_pack, num_domains: int):
    """post_pack on the row without the domain tags, plus `MIXTURE_TOKENS` of the row."""

    def fn(f: dict, rng: np.random.Generator) -> dict:
        tags, seg = f[_DOMAIN], f[f"{_DOMAIN}_segment_ids"]
        rest = {k: v for k, v in f.items() if not k.startswith(_DOMAIN)}
        return {**post_pack(rest, rng),
                MIXTURE_TOKENS: np.bincount(tags[seg > 0], minlength=num_domains)[:num_domains]}

    return fn


def _concat_streams(batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    if len(batches) == 1:
        return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def reshard_iterator_states(states: list[dict], process_count: int) -> list[dict]:
    """The iterator states of `len(states)` processes (in process order), re-cut for
    `process_count` processes at the same position of the same global batch sequence.

    The state of a `make_dataset` iterator is one state per packing stream it owns, and process
    p owns streams [p*S/P, (p+1)*S/P); so re-sharding is concatenating the per-stream states and
    cutting them anew. Valid when `num_streams` and `global_batch_size` stay the same (they fix
    the streams and their rows); not for mixtures, whose token counts are per process.
    """
    if any(set(s) != {"parents"} for s in states):
        raise ConfigError("reshard_iterator_states: only plain (non-mixture) make_dataset "
                          "iterator states can move to another process count.")
    streams = [p for s in states for p in s["parents"]]
    if process_count < 1 or len(streams) % process_count:
        raise ConfigError(f"{len(streams)} packing streams (make_dataset.num_streams) do not split "
                          f"over {process_count} processes; keep num_streams a multiple of the "
                          "process count.")
    per = len(streams) // process_count
    return [{"parents": streams[i * per:(i + 1) * per]} for i in range(process_count)]


def _split_paths(data_dir: str, split: str) -> list[str]:
    info = shards.load_dataset_info(data_dir)
    if split not in info.splits:
        raise DataError(f"{data_dir} has no split {split!r} (it has {sorted(info.splits)}).")
    return info.shard_paths(split)


@gin.configurable(denylist=["split"])
def make_dataset(data_dir: str, split: str, *, seq_len: int, global_batch_size: int, seed: int,
                 objective: Objective = NEXT_TOKEN, shuffle: bool = True,
                 num_epochs: int | None = None, num_streams: int | None = None,
                 shuffle_window: int = 1024, process_index: int | None = None,
                 process_count: int | None = None, mixture: dict[str, float] | None = None,
                 mixture_temperature: float | None = None,
                 mixture_datasets: dict[str, str] | None = None) -> grain.IterDataset:
    """Batches of this process's slice of `split` of a `tools/prepare_data` directory.

    Yields dicts of numpy arrays from `objective.post_pack` (next-token: inputs, targets,
    loss_mask, segment_ids, positions), each `[global_batch_size // process_count, seq_len]`.
    seed: derives the shuffle (a new permutation every epoch) and the objective's random
      transforms.
    num_epochs: None repeats forever; a number makes a finite pass, padded at the end (see the
      module docstring).
    num_streams: independent packing streams (default: process_count). Keep it fixed across
      runs with different process counts to get identical global batches.
    shuffle_window: with `shuffle`, packed rows are also shuffled in windows of this many rows
      per stream. Packing emits a long document as consecutive rows, so without it a batch is
      often one file (measured: loss swinging 2.8 <-> 4.7 between batches of the stdlib
      corpus); 1024 rows of 512 tokens hold ~100 files. 1 disables it.
    mixture: {domain: rate} -- token shares of the split's domains (see the module docstring);
      only for infinite passes. Domains left out are not read.
    mixture_temperature: rate every domain by (its tokens)^(1/T) instead.
    mixture_datasets: {name: data_dir} of other prepared directories (same tokenizer) whose
      whole split is a mixture component named `name`, beside `data_dir`'s domains.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    num_streams = process_count if num_streams is None else num_streams
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is not in [0, {process_count}).")
    if num_streams < 1 or num_streams % process_count:
        raise ConfigError(f"make_dataset.num_streams={num_streams} must be a positive multiple "
                          f"of the process count ({process_count}); set make_dataset.num_streams "
                          f"to {process_count} or a multiple of it.")
    if global_batch_size % num_streams:
        raise ConfigError(f"TrainConfig.global_batch_size={global_batch_size} must be a multiple "
                          f"of make_dataset.num_streams={num_streams}; change one of them.")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")
    if shuffle_window < 1:
        raise ConfigError(f"make_dataset.shuffle_window={shuffle_window} must be >= 1 (1: no "
                          "window shuffle).")

    source = shards.open_shards(_split_paths(data_dir, split))
    if len(source) < num_streams:
        raise DataError(f"Split {split!r} of {data_dir} has {len(source)} documents, fewer than "
                        f"num_streams={num_streams}: some streams would be empty. Lower "
                        "`make_dataset.num_streams` or prepare more data.")
    lengths = objective.lengths(seq_len)
    rows = global_batch_size // num_streams
    names = None
    if num_epochs is None and (mixture is not None or mixture_temperature is not None):
        components = mixture_components(data_dir, split, mixture_datasets)
        rates = mixture_rates(components, mixture, mixture_temperature)
        names = list(rates)
        if len(lengths) != 1:
            raise ConfigError(f"make_dataset.mixture needs an objective that packs one feature; "
                             f"{objective.name!r} packs {sorted(lengths)}.")
        key = next(iter(lengths))
        docs = _mixed_documents(components, rates, seed)
        docs = docs.map(_with_domain(key))
        pack_lengths = {**lengths, _DOMAIN: lengths[key]}
        post_pack = _count_domains(objective.post_pack, len(names))
    else:
        docs = grain.MapDataset.source(source)
        if shuffle:
            docs = docs.shuffle(seed=_derived_seed(seed, 0))
        docs = docs.repeat(num_epochs).map(_as_features)
        pack_lengths, post_pack = lengths, objective.post_pack

    def packed(s: int) -> grain.IterDataset:
        return _JsonSafePackIterDataset(
            docs[s::num_streams].to_iter_dataset(_READ_OPTIONS), pack_lengths)

    num_batches = None
    if num_epochs is not None:  # finite: every stream gets as many batches as the longest one
        num_batches = max(math.ceil(sum(1 for _ in packed(s)) / rows)
                          for s in range(num_streams))
    pad = pad_row(objective, seq_len)
    if names is not None:
        pad[MIXTURE_TOKENS] = np.zeros(len(names), np.int64)
    per_process = num_streams // process_count
    streams = []
    for s in range(process_index * per_process, (process_index + 1) * per_process):
        ds = packed(s).random_map(post_pack, seed=_derived_seed(seed, 2, s))
        if shuffle and shuffle_window > 1:
            ds = grain.experimental.WindowShuffleIterDataset(
                ds, window_size=shuffle_window, seed=_derived_seed(seed, 3, s))
        ds = ds.batch(rows, drop_remainder=False)
        streams.append(_PadBatchesIterDataset(ds, rows=rows, num_batches=num_batches, pad=pad))
    out = grain.experimental.ZipIterDataset(streams).map(_concat_streams)
    return out if names is None else _MixtureReportIterDataset(out, names)

