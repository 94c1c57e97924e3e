"""Prepare a corpus for training: split, train SentencePiece, tokenize, write ArrayRecord shards.

    python -m tools.prepare_data --data_dir=data/embedded [--gin_file=...] [--gin_param=...]

writes into `data_dir`:
  tokenizer.model                          SentencePiece model (seqio ids: pad 0, eos 1, unk 2)
  train-00000-of-00004.array_record        one record per document: int32 token ids + EOS
  train.web-00000-of-00004.array_record    (documents with a domain: shards per split and domain)
  validation-00000-of-00004.array_record   (shard k of n: <split>[.<domain>]-<k>-of-<n>)
  dataset.json                             fingerprint, vocab size, per-split/domain counts, shards

It streams: memory is bounded whatever the corpus size (the tokenizer sample, one window of
documents in flight per worker, one open shard per split and domain). Two passes over the input:

1. scan: every document's split (a stable hash of its id, `sources.split_of`) and domain
   (`metadata[domain_field]`), the per-input-file counts, the fingerprint, and a seeded sample of
   `tokenizer_sample_docs` training documents: those with the smallest sha256(seed, id) -- a
   sample that does not depend on the order or the machine the documents are read on;
2. SentencePiece trains on that sample; then every document is tokenized (in `num_workers`
   processes, or on Apache Beam with `runner='beam'`) and written to its shard. Within a split
   and domain, shard k holds documents [k*n/K, (k+1)*n/K) of that split and domain in corpus
   order; a split's record order is domain by domain (sorted names), then corpus order.

The corpus is a list of input files (`sources.Unit`, for the `files`, `jsonl` and `curated`
sources) or any iterable of documents (one unit; local runner only). `documents` is the one stream
of documents every pass reads. The local and Beam runners write byte-identical shards and the same
dataset.json (tested).

The fingerprint hashes the settings and, file by file, every document's id and text: if
`dataset.json` already holds the same fingerprint (and its files exist), nothing is redone.
`--force` rebuilds anyway.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import gzip
import hashlib
import heapq
import inspect
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import gin
import numpy as np
import tqdm

from llm.data import canaries, shards, sources, tokenizer

FORMAT_VERSION = 4  # bump when a code change alters what prepare writes for the same settings
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "validation")
NO_DOMAIN = ""  # documents without `metadata[domain_field]`
POOL_MIN_BYTES = 4 << 20  # smaller corpora are tokenized in-process (same output)


def gzip_bits_per_byte(texts: Iterable[str]) -> tuple[int, int, float]:
    """(gzip -9 size, UTF-8 size, bits per byte) of the texts concatenated as they are tokenized.

    A baseline for a model's bits per byte on the same bytes (gzip's header included).
    """
    data = "".join(texts).encode("utf-8")
    compressed = len(gzip.compress(data, compresslevel=9, mtime=0))
    return compressed, len(data), 8 * compressed / max(len(data), 1)


def unigram_bits(train_counts: np.ndarray, counts: np.ndarray) -> float:
    """Total bits of tokens with per-id `counts` under the train split's unigram distribution
    (add-one smoothed): the loss of a model that learned token frequencies and nothing else."""
    log_p = np.log2(train_counts + 1.0) - np.log2(train_counts.sum() + len(train_counts))
    return float(-(np.asarray(counts, np.float64) * log_p).sum())


def _corpus_name(corpus_fn: Callable) -> str:
    name = getattr(corpus_fn, "__name__", repr(corpus_fn))
    if corpus_fn is sources.corpus:
        try:
            name += f"(name={gin.query_parameter('corpus.name')!r})"
        except ValueError:
            name += "() (default corpus.name='embedded')"
    return name


# ---------------------------------------------------------------------------------------------
# Pass 1: scan (split, domain, counts, fingerprint, tokenizer sample). Plain functions over plain
# data so that Beam workers run exactly these.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Routing:
    """Where documents go: the split hash and the domain field."""

    validation_fraction: float
    domain_field: str | None

    def route(self, doc: sources.Document) -> tuple[str, str]:
        if doc.source == canaries.SOURCE:  # memorization canaries: training split only
            return "train", NO_DOMAIN
        domain = doc.metadata.get(self.domain_field) if self.domain_field else None
        return (sources.split_of(doc.id, self.validation_fraction),
                NO_DOMAIN if domain is None else str(domain))


def sample_key(doc: sources.Document, seed: int) -> int:
    """The tokenizer-sample priority of a document (smallest keys are sampled): 128 bits of
    sha256(seed, id, text), so the sample depends on neither order nor machine."""
    h = hashlib.sha256(f"{seed}\0{doc.id}\0".encode("utf-8", "surrogatepass"))
    h.update(doc.text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:16], "big")


def _doc_digest(h, doc: sources.Document) -> None:
    h.update(hashlib.sha256(doc.id.encode()).digest())
    h.update(hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest())


def scan_documents(docs: Iterable[sources.Document], routing: Routing, seed: int,
                   sample_docs: int) -> dict:
    """One unit's scan: {"digest": hex sha256 over ids and texts in order, "counts":
    {split: {domain: [documents, utf-8 bytes]}}, "sample": the `sample_docs` train documents with
    the smallest `sample_key`, as sorted [key, id, text] lists}."""
    h = hashlib.sha256()
    counts: dict[str, dict[str, list[int]]] = {}
    heap: list[tuple[int, str, str]] = []  # (-key, id, text): a max-heap of the sample
    for d in docs:
        _doc_digest(h, d)
        split, domain = routing.route(d)
        c = counts.setdefault(split, {}).setdefault(domain, [0, 0])
        c[0] += 1
        c[1] += len(d.text.encode("utf-8", "surrogatepass"))
        if split == "train" and sample_docs > 0:
            item = (-sample_key(d, seed), d.id, d.text)
            if len(heap) < sample_docs:
                heapq.heappush(heap, item)
            elif item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)
    sample = sorted([-k, i, t] for k, i, t in heap)
    return {"digest": h.hexdigest(), "counts": counts, "sample": sample}


def merge_samples(samples: Iterable[list], sample_docs: int) -> list[list]:
    """The `sample_docs` smallest [key, id, text] over all units, sorted."""
    return heapq.nsmallest(sample_docs, (s for part in samples for s in part))


def fingerprint_of(settings: dict, unit_digests: Sequence[str]) -> str:
    """sha256 over the settings and the units' document digests, in unit order."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode())
    for d in unit_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def fingerprint(docs: Iterable[sources.Document], settings: dict) -> str:
    """The fingerprint of a corpus read as one unit (`docs` in corpus order)."""
    h = hashlib.sha256()
    for d in docs:
        _doc_digest(h, d)
    return fingerprint_of(settings, [h.hexdigest()])


# ---------------------------------------------------------------------------------------------
# The layout: which shard a document goes to, from the scan's counts.
# ---------------------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def shard_prefix(split: str, domain: str) -> str:
    return split if domain == NO_DOMAIN else f"{split}.{_SAFE.sub('_', domain)}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shards per (split, domain) and where each unit's documents start in them.

    totals: {split: {domain: [documents, bytes]}}; num_shards: {split: {domain: K}};
    offsets: per unit, {split: {domain: documents of that split and domain in earlier units}}.
    """

    totals: dict
    num_shards: dict
    offsets: list

    @classmethod
    def from_scans(cls, counts: Sequence[dict], num_shards: int) -> Layout:
        totals: dict = {}
        offsets = []
        for c in counts:
            offsets.append({s: {d: totals.get(s, {}).get(d, [0, 0])[0] for d in c[s]} for s in c})
            for s, per in c.items():
                for d, (n, b) in per.items():
                    t = totals.setdefault(s, {}).setdefault(d, [0, 0])
                    t[0] += n
                    t[1] += b
        shards_ = {s: {d: min(num_shards, n) for d, (n, _) in per.items()}
                   for s, per in totals.items()}
        prefixes = collections.Counter(shard_prefix(s, d) for s in totals for d in totals[s])
        if clash := [p for p, n in prefixes.items() if n > 1]:
            raise sources.DataError(f"Domains {clash} map to the same shard file names; rename "
                                    "the domains (letters, digits, '_' and '-' only).")
        return cls(totals, shards_, offsets)

    def shard_of(self, split: str, domain: str, position: int) -> int:
        n, k = self.totals[split][domain][0], self.num_shards[split][domain]
        return bisect.bisect_right([i * n // k for i in range(k + 1)], position) - 1

    def shard_file(self, split: str, domain: str, k: int) -> str:
        return shards.shard_name(shard_prefix(split, domain), k, self.num_shards[split][domain])

    def shard_keys(self) -> list[tuple[str, str, int]]:
        """Every (split, domain, shard) in record order."""
        return [(s, d, k) for s in SPLITS for d in sorted(self.totals.get(s, {}))
                for k in range(self.num_shards[s][d])]


# ---------------------------------------------------------------------------------------------
# Pass 2: tokenize and write.
# ---------------------------------------------------------------------------------------------

class _ByteCounter:
    """A write-only file that only counts bytes (the size of a streamed gzip)."""

    def __init__(self):
        self.size = 0

    def write(self, b) -> int:
        self.size += len(b)
        return len(b)

    def flush(self) -> None:
        pass


class ShardWriter:
    """Writes one shard (records = int32 tokens) and its statistics: documents, tokens, bytes,
    per-id token counts and, for validation, the gzip -9 size of its text."""

    def __init__(self, path: str, vocab_size: int, gzip_text: bool):
        from array_record.python import array_record_module

        self.path, self.tmp = path, path + ".tmp"
        self._writer = array_record_module.ArrayRecordWriter(self.tmp, shards.WRITER_OPTIONS)
        self._counts = np.zeros(vocab_size, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._sink = _ByteCounter() if gzip_text else None
        self._gz = gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=self._sink,
                                 mtime=0) if gzip_text else None
        self.num_documents = self.num_tokens = self.num_bytes = 0

    def add(self, tokens: np.ndarray, text: str) -> None:
        self._writer.write(np.asarray(tokens, shards.TOKEN_DTYPE).tobytes())
        data = text.encode("utf-8", "surrogatepass")
        if self._gz is not None:
            self._gz.write(data)
        self.num_documents += 1
        self.num_tokens += len(tokens)
        self.num_bytes += len(data)
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        if self._pending_tokens > 1 << 20:
            self._flush_counts()

    def _flush_counts(self) -> None:
        if self._pending:
            self._counts += np.bincount(np.concatenate(self._pending),
                                        minlength=len(self._counts))[:len(self._counts)]
        self._pending, self._pending_tokens = [], 0

    def close(self) -> dict:
        """Closes and renames the shard; returns its statistics (JSON-able)."""
        self._writer.close()
        os.replace(self.tmp, self.path)
        self._flush_counts()
        gz = None
        if self._gz is not None:
            self._gz.close()
            gz = self._sink.size
        return {"file": os.path.basename(self.path), "num_documents": self.num_documents,
                "num_tokens": self.num_tokens, "num_bytes": self.num_bytes, "gzip_bytes": gz,
                "counts": self._counts.tolist()}


def assemble_splits(layout: Layout, stats: dict[tuple[str, str, int], dict], vocab_size: int
                    ) -> dict[str, shards.SplitInfo]:
    """The SplitInfos of dataset.json from every shard's statistics (same for both runners)."""
    counts = {s: np.zeros(vocab_size, np.int64) for s in SPLITS}
    out: dict = {s: {"num_documents": 0, "num_tokens": 0, "num_bytes": 0, "shards": [],
                     "gzip_bytes": 0, "domains": {}} for s in SPLITS}
    for s, d, k in layout.shard_keys():
        st, o = stats[(s, d, k)], out[s]
        dom = o["domains"].setdefault(d, {"num_documents": 0, "num_tokens": 0, "num_bytes": 0,
                                          "shards": []})
        for key in ("num_documents", "num_tokens", "num_bytes"):
            o[key] += st[key]
            dom[key] += st[key]
        o["shards"].append(st["file"])
        dom["shards"].append(st["file"])
        o["gzip_bytes"] += st["gzip_bytes"] or 0
        counts[s] += np.asarray(st["counts"], np.int64)
    splits = {}
    for s in SPLITS:
        o = out[s]
        val = s == "validation"
        splits[s] = shards.SplitInfo(
            num_documents=o["num_documents"], num_tokens=o["num_tokens"],
            num_bytes=o["num_bytes"], shards=o["shards"],
            gzip_bytes=o["gzip_bytes"] if val else None,
            unigram_bits=unigram_bits(counts["train"], counts[s]) if val else None,
            domains=o["domains"])
    return splits


def _chunks(items: Iterable, max_docs: int = 256, max_chars: int = 1 << 20) -> Iterator[list]:
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[-1].text)
        if len(chunk) >= max_docs or size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _tokenized(items: Iterable[tuple], model_path: str, num_workers: int
               ) -> Iterator[tuple[tuple, np.ndarray]]:
    """(item, tokens + EOS) for items (..., Document), in order; tokenized in `num_workers`
    processes with at most 2 chunks per worker in flight (bounded memory)."""
    if num_workers <= 1:
        tok = tokenizer.load_tokenizer(model_path)
        for chunk in _chunks(items):
            yield from zip(chunk, tokenizer.encode_documents(tok, [it[-1].text for it in chunk]))
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may run JAX
    with ctx.Pool(num_workers, initializer=tokenizer.init_worker, initargs=(model_path,)) as pool:
        window: collections.deque = collections.deque()
        for chunk in _chunks(items):
            window.append((chunk, pool.apply_async(tokenizer.encode_in_worker,
                                                   ([it[-1].text for it in chunk],))))
            if len(window) >= 2 * num_workers:
                done, result = window.popleft()
                yield from zip(done, result.get())
        while window:
            done, result = window.popleft()
            yield from zip(done, result.get())


def documents(units: Sequence, corpus_fn: Callable) -> Iterator[tuple[int, sources.Document]]:
    """(unit index, document) for the whole corpus in order: the stream every pass reads.

    units: `sources.Unit`s, or [None] for a corpus that is one iterable (`corpus_fn()`).
    """
    for u, unit in enumerate(units):
        for d in (corpus_fn() if unit is None else sources.read_unit(unit)):
            yield u, d


def _write_local(data_dir: str, units: Sequence, corpus_fn: Callable, routing: Routing,
                 layout: Layout, model_path: str, vocab_size: int, num_workers: int) -> dict:
    """Tokenizes the corpus and writes every shard; returns {(split, domain, k): stats}."""
    position: dict[tuple[str, str], int] = collections.Counter()
    open_: dict[tuple[str, str], tuple[int, ShardWriter]] = {}
    stats = {}
    total = sum(n for per in layout.totals.values() for n, _ in per.values())
    routed = ((*routing.route(d), d) for _, d in documents(units, corpus_fn))
    with tqdm.tqdm(total=total, desc="tokenize", unit="doc", file=sys.stderr,
                   disable=None) as bar:
        for (split, domain, doc), tokens in _tokenized(routed, model_path, num_workers):
            key = (split, domain)
            k = layout.shard_of(split, domain, position[key])
            position[key] += 1
            if key not in open_ or open_[key][0] != k:
                if key in open_:
                    stats[(*key, open_[key][0])] = open_[key][1].close()
                path = os.path.join(data_dir, layout.shard_file(split, domain, k))
                open_[key] = (k, ShardWriter(path, vocab_size, split == "validation"))
            open_[key][1].add(tokens, doc.text)
            bar.update(1)
    for key, (k, w) in open_.items():
        stats[(*key, k)] = w.close()
    return stats


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------

def _train_sentencepiece_settings() -> dict:
    """train_sentencepiece's keyword defaults with its gin bindings applied."""
    params = inspect.signature(tokenizer.train_sentencepiece).parameters.values()
    out = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    out.update(gin.get_bindings(tokenizer.train_sentencepiece))
    if not out.get("user_defined_symbols"):  # the default: fingerprints from before it existed
        out.pop("user_defined_symbols", None)
    return out


def _reusable(data_dir: str, fp: str) -> shards.DatasetInfo | None:
    try:
        info = shards.load_dataset_info(data_dir)
    except sources.DataError:
        return None
    files = [info.tokenizer_path] + [p for s in info.splits for p in info.shard_paths(s)]
    if info.fingerprint != fp or not all(os.path.isfile(p) for p in files):
        return None
    return info


def _units(corpus_fn: Callable) -> list:
    """The corpus's input files, or [None] for a corpus that is one iterable."""
    corpus = corpus_fn()
    units = getattr(corpus, "units", None)
    return list(units) if units is not None else [None]


def _clear(data_dir: str) -> None:
    os.makedirs(data_dir, exist_ok=True)
    stale = os.path.join(data_dir, shards.DATASET_JSON)
    if os.path.exists(stale):
        os.remove(stale)  # the directory is inconsistent until the new one is written
    for name in os.listdir(data_dir):
        if name.endswith((".array_record", ".array_record.tmp")) and name.startswith(SPLITS):
            os.remove(os.path.join(data_dir, name))


@gin.configurable
def prepare(data_dir: str, *, corpus_fn: Callable[[], Iterable[sources.Document]] = sources.corpus,
            vocab_size: int = 8192, validation_fraction: float = 0.05, num_shards: int = 4,
            seed: int = 0, force: bool = False, tokenizer_sample_docs: int = 10_000,
            domain_field: str | None = "domain", num_workers: int | None = None,
            runner: str = "local", beam_options: Sequence[str] = (),
            tokenizer_model: str | None = None, rescan: bool = True) -> shards.DatasetInfo:
    """Splits, trains the tokenizer, tokenizes and shards `corpus_fn()` into `data_dir`.

    vocab_size: SentencePiece pieces (other tokenizer options: gin `train_sentencepiece.*`).
    validation_fraction: expected share of documents in the validation split.
    num_shards: shards per split and domain (fewer if it has fewer documents).
    seed: tokenizer-sample seed (which documents, and the order of their chunks).
    force: rebuild even if `dataset.json` has the same fingerprint.
    tokenizer_sample_docs: training documents SentencePiece's sample is drawn from (memory grows
      with it: up to twice this many documents are held while merging per-file samples);
      `train_sentencepiece.max_training_chars` then caps the characters used.
    domain_field: metadata field naming a document's domain (shards are written per split and
      domain, and `make_dataset.mixture` mixes domains); None puts everything in one domain.
    num_workers: tokenizing processes for the local runner (default: the CPU count, at most 16;
      corpora under `POOL_MIN_BYTES` are tokenized in-process).
    runner: "local" or "beam" (Apache Beam; `beam_options` are its pipeline options, e.g.
      ['--runner=DataflowRunner', '--project=...']). Both write byte-identical shards.
    tokenizer_model: an existing `tokenizer.model` (e.g. another prepared directory's) to use
      instead of training one: datasets to be mixed at train time must share their tokenizer.
    rescan: False reuses a complete `data_dir` (dataset.json and every file it names) without
      reading the corpus again -- for corpora too large to scan at every training start (e.g.
      prepared on Beam); inputs and settings are then not rechecked against the fingerprint.
    """
    start = time.time()
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise sources.DataError(
            f"data_dir {data_dir!r} is an existing file, not a directory; pass a directory "
            "(gin: pretrain.data_dir / pretrain_mlm.data_dir, or --data_dir).")
    if not os.path.isfile(os.path.join(data_dir, shards.DATASET_JSON)):
        state = "does not exist" if not os.path.exists(data_dir) else "holds no dataset.json"
        print(f"prepare_data: {data_dir} {state}; preparing {_corpus_name(corpus_fn)} there "
              "(a typo in the path of your own prepared data also lands here).", flush=True)
    if not rescan and not force:
        try:
            info = shards.load_dataset_info(data_dir)
        except sources.DataError:
            info = None
        if info is not None and _reusable(data_dir, info.fingerprint) is not None:
            print(f"prepare_data: reusing {data_dir} without rescanning the corpus "
                  f"(prepare.rescan=False; fingerprint {info.fingerprint[:12]})")
            return info
    if runner not in ("local", "beam"):
        raise sources.DataError(f"prepare.runner={runner!r}: choose 'local' or 'beam'.")
    if tokenizer_sample_docs < 1:
        raise sources.DataError(f"prepare.tokenizer_sample_docs={tokenizer_sample_docs} must be "
                                ">= 1 (documents SentencePiece is trained on).")
    num_workers = min(os.cpu_count() or 1, 16) if num_workers is None else num_workers
    units = _units(corpus_fn)
    canary_spec = canaries.spec()  # secret canaries for memorization audits
    if (canary_unit := canaries.unit(data_dir, canary_spec)) is not None:
        units.append(canary_unit)
    if runner == "beam" and None in units:
        raise sources.DataError(
            f"prepare.runner='beam' needs a corpus of files; {_corpus_name(corpus_fn)} is one "
            "iterable. Use corpus.name='files', 'jsonl' or 'curated', or prepare.runner='local'.")
    routing = Routing(validation_fraction, domain_field)
    model_hash = None
    if tokenizer_model is not None:
        if not os.path.isfile(tokenizer_model):
            raise sources.DataError(f"prepare.tokenizer_model={tokenizer_model!r} does not exist; "
                                    "point it at a tokenizer.model or leave it unset to train one.")
        tokenizer.load_tokenizer(tokenizer_model)  # checks the id convention
        with open(tokenizer_model, "rb") as f:
            model_hash = hashlib.sha256(f.read()).hexdigest()
    settings = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "validation_fraction": validation_fraction,
        "num_shards": num_shards,
        "seed": seed,
        "tokenizer_sample_docs": tokenizer_sample_docs,
        "domain_field": domain_field,
        "spm_options": tokenizer.SPM_OPTIONS,
        "train_sentencepiece": _train_sentencepiece_settings(),
    }
    if canary_spec is not None:
        settings["canaries"] = canary_spec.settings()
    if model_hash is not None:  # a given tokenizer replaces the training settings
        settings["tokenizer_model_sha256"] = model_hash
        for key in ("vocab_size", "tokenizer_sample_docs", "spm_options", "train_sentencepiece"):
            del settings[key]

    t = time.time()
    if runner == "beam":
        from llm.data import prepare_beam

        scans = prepare_beam.scan(units, routing, seed, tokenizer_sample_docs, data_dir,
                                  list(beam_options))
    else:
        scans, sample = [], []
        for u in units:  # the running sample is merged per unit: at most 2x its size in memory
            scans.append(scan_documents((d for _, d in documents([u], corpus_fn)), routing,
                                        seed, tokenizer_sample_docs))
            sample = merge_samples([sample, scans[-1].pop("sample")], tokenizer_sample_docs)
        scans[0]["sample"] = sample
        del sample
    fp = fingerprint_of(settings, [s["digest"] for s in scans])
    if not force and (info := _reusable(data_dir, fp)) is not None:
        print(f"prepare_data: {data_dir} is up to date (fingerprint {fp[:12]}); reusing it.")
        return info
    layout = Layout.from_scans([s["counts"] for s in scans], num_shards)
    if not layout.totals:
        raise sources.DataError(
            f"The corpus {_corpus_name(corpus_fn)} yielded no documents. Point the corpus at "
            "data (gin: `corpus.name` and its source's arguments, e.g. `text_files.pattern` or "
            "`jsonl.path`), or pass another `prepare.corpus_fn`.")
    num_docs = sum(n for per in layout.totals.values() for n, _ in per.values())
    for split in SPLITS:
        if split not in layout.totals:
            raise sources.DataError(
                f"The {split} split is empty: {num_docs} documents from "
                f"{_corpus_name(corpus_fn)} with validation_fraction={validation_fraction}. "
                "Adjust `prepare.validation_fraction` or add documents to the corpus.")
    print(f"prepare_data: scanned {num_docs} documents in {len(units)} input unit(s) in "
          f"{time.time() - t:.1f} s")

    _clear(data_dir)
    t = time.time()
    sample = merge_samples((s.get("sample", []) for s in scans), tokenizer_sample_docs)
    del scans
    model_path = os.path.join(data_dir, TOKENIZER_FILE)
    if tokenizer_model is not None:
        if os.path.abspath(tokenizer_model) != os.path.abspath(model_path):
            shutil.copyfile(tokenizer_model, model_path)
        tok = tokenizer.load_tokenizer(model_path)
        print(f"prepare_data: using the {tok.vocab_size}-piece tokenizer {tokenizer_model}")
    else:
        tokenizer.train_sentencepiece((text for _, _, text in sample), model_path,
                                      vocab_size=vocab_size, seed=seed)
        tok = tokenizer.load_tokenizer(model_path)
        print(f"prepare_data: trained a {tok.vocab_size}-piece tokenizer in "
              f"{time.time() - t:.1f} s")
    del sample

    total_bytes = sum(b for per in layout.totals.values() for _, b in per.values())
    if total_bytes < POOL_MIN_BYTES:
        num_workers = 1  # starting worker processes costs more than tokenizing a few MB
    if runner == "beam":
        stats = prepare_beam.write(units, routing, layout, model_path, tok.vocab_size, data_dir,
                                   list(beam_options))
    else:
        stats = _write_local(data_dir, units, corpus_fn, routing, layout, model_path,
                             tok.vocab_size, num_workers)
    splits = assemble_splits(layout, stats, tok.vocab_size)
    info = shards.DatasetInfo(fingerprint=fp, vocab_size=tok.vocab_size, tokenizer=TOKENIZER_FILE,
                              splits=splits, settings=settings, data_dir=data_dir)
    info.save()
    for split, s in splits.items():
        domains = ", ".join(f"{d or '(none)'}: {v['num_documents']}"
                            for d, v in s.domains.items())
        print(f"prepare_data: {split}: {s.num_documents} documents ({domains}), {s.num_tokens} "
              f"tokens, {s.num_bytes} bytes ({s.num_bytes / s.num_tokens:.2f} bytes/token)")
    print(f"prepare_data: wrote {data_dir} in {time.time() - start:.1f} s (fingerprint {fp[:12]}, "
          f"runner {runner})")
    return info


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.prepare_data`: exit code 0, or 2 with one line on stderr for a bad
    setting or bad data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="output directory")
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file(s)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding(s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    from llm.config import ConfigError, parse_gin

    try:
        parse_gin(args.gin_file, args.gin_param, skip_unknown=True)
        prepare(args.data_dir, **({"force": True} if args.force else {}))
    except (ConfigError, sources.DataError) as e:
        print(f"prepare_data: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
