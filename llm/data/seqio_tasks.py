"""seqio interop, both ways; our grain pipeline stays the runtime.

* `register_task`: our text sources as a seqio `Task` (tokenized with our vocabulary as a seqio
  `SentencePieceVocabulary`, extra ids included), for people whose tooling speaks seqio.
* `seqio_to_dataset`: the examples of any registered seqio Task or Mixture (theirs or ours) as a
  prepared data directory -- tokenizer.model, ArrayRecord shards, dataset.json -- exactly what
  `tools/prepare_data` writes, so `make_dataset` and every objective (next-token, prefix-LM,
  BERT MLM, span corruption) read it unchanged.

seqio and TensorFlow are imported lazily (4+ s), only when these functions run.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from llm.data import shards, sources
from llm.data.objectives import EOS_ID
from llm.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")
PREPARED_BY = "seqio_to_dataset"  # dataset.json settings["prepared_by"]: not rebuilt by `prepare`


def register_task(name: str, tokenizer: Tokenizer, *,
                  corpus_fn: Callable[[], Iterable[sources.Document]] = sources.corpus,
                  validation_fraction: float = 0.05):
    """Register (replacing any previous one) and return a seqio Task named `name` over the
    documents of `corpus_fn`, split into train / validation by `sources.split_of` as
    `tools/prepare_data` splits them.

    Examples: {"text": document text, "id": document id, "targets": int32 token ids + EOS}; the
    "targets" feature's vocabulary is `tokenizer.to_seqio()` (its extra ids are the sentinels a
    span-corruption task uses). The ids are our Python SentencePiece tokenization, identical to
    the prepared shards: seqio's own `tokenize` preprocessor (TF SentencePiece) breaks ties
    between equal-score pieces differently on long whitespace runs (~1 % of the tokens of Python
    source differ; the text is the same).
    """
    import seqio
    import tensorflow as tf

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # documents come in corpus order
        if split not in SPLITS:
            raise ValueError(f"seqio task {name!r} has splits {SPLITS}, not {split!r}.")

        def generate():
            for d in corpus_fn():
                if sources.split_of(d.id, validation_fraction) == split:
                    ids = np.asarray(tokenizer.encode(d.text) + [EOS_ID], np.int32)
                    yield {"text": d.text, "id": d.id, "targets": ids}

        return tf.data.Dataset.from_generator(generate, output_signature={
            "text": tf.TensorSpec([], tf.string), "id": tf.TensorSpec([], tf.string),
            "targets": tf.TensorSpec([None], tf.int32)})

    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=SPLITS), preprocessors=[],
        output_features={"targets": seqio.Feature(tokenizer.to_seqio(), add_eos=True)})


def _examples(task_or_mixture, split: str, feature: str, sequence_length: dict | None
              ) -> Iterable[np.ndarray]:
    ds = task_or_mixture.get_dataset(sequence_length=sequence_length, split=split,
                                     shuffle=False, num_epochs=1, use_cached=False)
    for ex in ds.as_numpy_iterator():
        if feature not in ex:
            raise ValueError(f"seqio examples of {task_or_mixture.name!r} have no feature "
                             f"{feature!r} (they have {sorted(ex)}); pass "
                             "`seqio_to_dataset(..., feature=...)`.")
        ids = np.asarray(ex[feature], np.int32)
        yield ids if len(ids) and ids[-1] == EOS_ID else np.append(ids, EOS_ID).astype(np.int32)


def seqio_to_dataset(name: str, data_dir: str, *, feature: str = "targets",
                     splits: Sequence[str] = SPLITS, sequence_length: dict | None = None,
                     num_shards: int = 4) -> shards.DatasetInfo:
    """Write the examples of the seqio Task or Mixture `name` as a prepared data directory.

    Each example's `feature` (token ids from the task's SentencePiece vocabulary, which must use
    seqio's pad 0 / eos 1 / unk 2) becomes one document, EOS-terminated. `splits` are the seqio
    splits to export; our pipeline reads "train" and "validation", so map names accordingly
    (e.g. splits=("train", "validation")). Returns the DatasetInfo (also dataset.json).
    """
    import seqio

    task = seqio.get_mixture_or_task(name)
    vocab = task.output_features[feature].vocabulary
    model_file = getattr(vocab, "sentencepiece_model_file", None)
    if model_file is None:
        raise ValueError(f"seqio {name!r}: feature {feature!r} uses {type(vocab).__name__}; only "
                         "SentencePieceVocabulary can become our tokenizer.model.")
    os.makedirs(data_dir, exist_ok=True)
    tokenizer_path = os.path.join(data_dir, "tokenizer.model")
    if os.path.abspath(model_file) != os.path.abspath(tokenizer_path):
        shutil.copyfile(model_file, tokenizer_path)
    tok = load_tokenizer(tokenizer_path)  # checks the pad/eos/unk convention
    h = hashlib.sha256(f"seqio:{name}:{feature}:{sequence_length}".encode())
    split_infos = {}
    for split in splits:
        docs = list(_examples(task, split, feature, sequence_length))
        if not docs:
            raise ValueError(f"seqio {name!r} split {split!r} has no examples.")
        for d in docs:
            h.update(d.tobytes())
        paths = shards.write_shards(docs, data_dir, split, min(num_shards, len(docs)))
        text = "".join(tok.decode(d) for d in docs)
        data = text.encode("utf-8")
        split_infos[split] = shards.SplitInfo(
            num_documents=len(docs), num_tokens=int(sum(len(d) for d in docs)),
            num_bytes=len(data), shards=[os.path.basename(p) for p in paths],
            gzip_bytes=len(gzip.compress(data, compresslevel=9, mtime=0))
            if split == "validation" else None)
    info = shards.DatasetInfo(fingerprint=h.hexdigest(), vocab_size=tok.vocab_size,
                              tokenizer="tokenizer.model", splits=split_infos,
                              settings={"prepared_by": PREPARED_BY, "seqio": name,
                                        "feature": feature, "sequence_length": sequence_length},
                              data_dir=data_dir)
    info.save()
    return info
