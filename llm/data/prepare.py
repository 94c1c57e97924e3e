"""Prepare a corpus for training: split, train SentencePiece, tokenize, write ArrayRecord shards.

    python -m tools.prepare_data --data_dir=data/embedded [--gin_file=...] [--gin_param=...]

writes into `data_dir`:
  tokenizer.model                          SentencePiece model (seqio ids: pad 0, eos 1, unk 2)
  train-00000-of-00004.array_record        one record per document: int32 token ids + EOS
  validation-00000-of-00004.array_record (shard k of n: <split>-<k>-of-<n>)
  dataset.json                             fingerprint, vocab size, per-split counts, shards

Documents go to train or validation by a stable hash of their id (`sources.split_of`); the
tokenizer is trained on the train split only. The fingerprint hashes the document ids and texts,
the tokenizer settings and the split settings: if `dataset.json` already holds the same
fingerprint (and its files exist), nothing is redone. `--force` rebuilds anyway.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import gin
import numpy as np
import tqdm

from llm.data import shards, sources, tokenizer
from llm.data.objectives import EOS_ID
from llm.eval import canaries

FORMAT_VERSION = 3  # bump when a code change alters what prepare writes for the same settings
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "validation")


def gzip_bits_per_byte(texts: Iterable[str]) -> tuple[int, int, float]:
    """(gzip -9 size, UTF-8 size, bits per byte) of the texts concatenated as they are tokenized.

    A baseline for a model's bits per byte on the same bytes (gzip's header included).
    """
    data = "".join(texts).encode("utf-8")
    compressed = len(gzip.compress(data, compresslevel=9, mtime=0))
    return compressed, len(data), 8 * compressed / max(len(data), 1)


def unigram_bits(train_counts: np.ndarray, arrays: list[np.ndarray]) -> float:
    """Total bits of `arrays`' tokens under the train split's unigram distribution (add-one
    smoothed): the loss of a model that learned token frequencies and nothing else."""
    log_p = np.log2(train_counts + 1.0) - np.log2(train_counts.sum() + len(train_counts))
    return float(-log_p[np.concatenate(arrays)].sum())


def _corpus_name(corpus_fn: Callable) -> str:
    name = getattr(corpus_fn, "__name__", repr(corpus_fn))
    if corpus_fn is sources.corpus:
        try:
            name += f"(name={gin.query_parameter('corpus.name')!r})"
        except ValueError:
            name += "() (default corpus.name='embedded')"
    return name


def fingerprint(docs: list[sources.Document], settings: dict) -> str:
    """sha256 over the settings and every document's id and text (in corpus order)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode())
    for d in docs:
        h.update(hashlib.sha256(d.id.encode()).digest())
        h.update(hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


def _tokenize(tok: tokenizer.Tokenizer, docs: list[sources.Document], split: str,
              chunk: int = 64) -> Iterator[np.ndarray]:
    with tqdm.tqdm(total=len(docs), desc=f"tokenize {split}", unit="doc", file=sys.stderr,
                   disable=None) as bar:
        for i in range(0, len(docs), chunk):
            batch = docs[i:i + chunk]
            for ids in tok.encode_batch([d.text for d in batch]):
                ids.append(EOS_ID)
                yield np.asarray(ids, dtype=np.int32)
            bar.update(len(batch))


def _train_sentencepiece_settings() -> dict:
    """train_sentencepiece's keyword defaults with its gin bindings applied."""
    params = inspect.signature(tokenizer.train_sentencepiece).parameters.values()
    out = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    out.update(gin.get_bindings(tokenizer.train_sentencepiece))
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


@gin.configurable
def prepare(data_dir: str, *, corpus_fn: Callable[[], Iterable[sources.Document]] = sources.corpus,
            vocab_size: int = 8192, validation_fraction: float = 0.05, num_shards: int = 4,
            seed: int = 0, force: bool = False) -> shards.DatasetInfo:
    """Splits, trains the tokenizer, tokenizes and shards `corpus_fn()` into `data_dir`.

    vocab_size: SentencePiece pieces (other tokenizer options: gin `train_sentencepiece.*`).
    validation_fraction: expected share of documents in the validation split.
    num_shards: shards per split (fewer if a split has fewer documents).
    seed: tokenizer training-sample seed.
    force: rebuild even if `dataset.json` has the same fingerprint.
    """
    start = time.time()
    docs = list(corpus_fn())
    if not docs:
        raise sources.DataError(
            f"The corpus {_corpus_name(corpus_fn)} yielded no documents. Point the corpus at "
            "data (gin: `corpus.name` and its source's arguments, e.g. `text_files.pattern` or "
            "`jsonl.path`), or pass another `prepare.corpus_fn`.")
    settings = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "validation_fraction": validation_fraction,
        "num_shards": num_shards,
        "seed": seed,
        "spm_options": tokenizer.SPM_OPTIONS,
        "train_sentencepiece": _train_sentencepiece_settings(),
    }
    if (canary_spec := canaries.spec()) is not None:  # secret canaries for memorization audits
        settings["canaries"] = canary_spec.settings()
    fp = fingerprint(docs, settings)
    if not force and (info := _reusable(data_dir, fp)) is not None:
        print(f"prepare_data: {data_dir} is up to date (fingerprint {fp[:12]}); reusing it.")
        return info

    split_docs = sources.split_documents(docs, validation_fraction)
    split_docs["train"] = list(canaries.insert(split_docs["train"], data_dir, canary_spec))
    for split, ds in split_docs.items():
        if not ds:
            raise sources.DataError(
                f"The {split} split is empty: {len(docs)} documents from "
                f"{_corpus_name(corpus_fn)} with validation_fraction={validation_fraction}. "
                "Adjust `prepare.validation_fraction` or add documents to the corpus.")

    os.makedirs(data_dir, exist_ok=True)
    stale = os.path.join(data_dir, shards.DATASET_JSON)
    if os.path.exists(stale):
        os.remove(stale)  # the directory is inconsistent until the new one is written
    for name in os.listdir(data_dir):
        if name.endswith(".array_record") and name.startswith(SPLITS):
            os.remove(os.path.join(data_dir, name))

    t = time.time()
    model_path = tokenizer.train_sentencepiece((d.text for d in split_docs["train"]),
                                               os.path.join(data_dir, TOKENIZER_FILE),
                                               vocab_size=vocab_size, seed=seed)
    tok = tokenizer.load_tokenizer(model_path)
    print(f"prepare_data: trained a {tok.vocab_size}-piece tokenizer in {time.time() - t:.1f} s")

    splits = {}
    counts = None
    for split in SPLITS:  # train first: its token counts are the unigram baseline
        ds = split_docs[split]
        arrays = list(_tokenize(tok, ds, split))
        paths = shards.write_shards(arrays, data_dir, split, min(num_shards, len(ds)))
        gz = unigram = None
        if split == "train":
            counts = np.bincount(np.concatenate(arrays), minlength=tok.vocab_size)
        else:
            gz = gzip_bits_per_byte(d.text for d in ds)[0]
            unigram = unigram_bits(counts, arrays)
        splits[split] = shards.SplitInfo(
            num_documents=len(ds), num_tokens=int(sum(len(a) for a in arrays)),
            num_bytes=sum(len(d.text.encode("utf-8")) for d in ds),
            shards=[os.path.basename(p) for p in paths], gzip_bytes=gz, unigram_bits=unigram)
    info = shards.DatasetInfo(fingerprint=fp, vocab_size=tok.vocab_size, tokenizer=TOKENIZER_FILE,
                              splits=splits, settings=settings, data_dir=data_dir)
    info.save()
    for split, s in splits.items():
        print(f"prepare_data: {split}: {s.num_documents} documents, {s.num_tokens} tokens, "
              f"{s.num_bytes} bytes ({s.num_bytes / s.num_tokens:.2f} bytes/token)")
    print(f"prepare_data: wrote {data_dir} in {time.time() - start:.1f} s (fingerprint {fp[:12]})")
    return info


def main(argv: list[str] | None = None) -> shards.DatasetInfo:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="output directory")
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file(s)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding(s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    from llm.config import parse_gin

    parse_gin(args.gin_file, args.gin_param, skip_unknown=True)
    try:
        return prepare(args.data_dir, **({"force": True} if args.force else {}))
    except sources.DataError as e:
        sys.exit(f"prepare_data: error: {e}")


if __name__ == "__main__":
    main()
