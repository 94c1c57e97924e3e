"""Decontamination: drop (or flag) documents sharing word 13-grams with evaluation sets.

The evaluation texts' 13-grams (same tokenization as MinHash: lowercased words, punctuation
ignored) are hashed to 64 bits once, in the main process; each document's 13-grams are then
looked up with one vectorized `np.isin`. Evaluation texts shorter than `n` words count as one
n-gram of all their words.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import gin
import numpy as np

from llm.data.curate.minhash import shingle_hashes, word_hashes
from llm.data.curate.records import CurationError
from llm.data.sources import Document


def eval_ngrams(texts: list[str], n: int = 13) -> np.ndarray:
    """Sorted unique 64-bit hashes of the texts' word n-grams."""
    if not texts:
        return np.empty(0, np.uint64)
    wh, counts = word_hashes(texts)
    sh, _ = shingle_hashes(wh, counts, n)
    return np.unique(sh)


def load_eval_texts(paths: list[str], text_field: str = "text") -> list[str]:
    """Texts of evaluation files: `.jsonl` (field `text_field`) or plain text (one per file)."""
    texts = []
    for p in paths:
        if not os.path.isfile(p):
            raise CurationError(f"Evaluation set {p!r} does not exist. Fix `decontam.eval_files`.")
        if p.endswith(".jsonl"):
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        texts.append(str(rec[text_field]) if isinstance(rec, dict) else str(rec))
        else:
            with open(p, encoding="utf-8") as f:
                texts.append(f.read())
    return texts


def decontam(doc: Document, ngrams: np.ndarray, n: int = 13, mode: str = "drop",
             min_matches: int = 1) -> Document | str:
    """Remove (`mode='drop'`) or tag `metadata["contaminated"]` (`mode='flag'`)."""
    if len(ngrams) == 0:
        return doc
    wh, counts = word_hashes([doc.text])
    sh, _ = shingle_hashes(wh, counts, n)
    hits = int(np.isin(sh, ngrams, assume_unique=False).sum())
    if hits < min_matches:
        return doc
    if mode == "drop":
        return "eval_contamination"
    return dataclasses.replace(doc, metadata={**doc.metadata, "contaminated_ngrams": hits})


@gin.configurable("decontam")
def decontam_step(eval_files: tuple[str, ...] = (), eval_texts: tuple[str, ...] = (),
                  text_field: str = "text", n: int = 13, mode: str = "drop",
                  min_matches: int = 1):
    """Gin: `eval_files` (.jsonl with `text_field`, or text files) and/or inline `eval_texts`;
    `n`-gram size (13, as GPT-3); `mode` 'drop' or 'flag'; `min_matches` shared n-grams."""
    if mode not in ("drop", "flag"):
        raise CurationError(f"decontam.mode={mode!r}; use 'drop' or 'flag'.")
    texts = load_eval_texts(list(eval_files), text_field) + list(eval_texts)
    return functools.partial(decontam, ngrams=eval_ngrams(texts, n), n=n, mode=mode,
                             min_matches=min_matches)
