"""Shared helpers for the data tests: a tiny, deterministic corpus."""

from __future__ import annotations

import functools

from llm.data import sources

TINY_VOCAB = 400  # 3 special + 256 bytes + the corpus characters + a few merges

ENGLISH = ("The quick brown fox jumps over the lazy dog. Packing keeps every token, and "
           "evaluation scores each validation token exactly once.\n")
UNICODE = "Grüße, naïve café — 東京 🙂\n\ttabbed\r\nwindows line\n"


@functools.cache
def tiny_docs(n: int = 48) -> tuple[sources.Document, ...]:
    """`n` documents: stdlib sources cut to varied lengths, English, and non-ASCII text.

    Lengths range from a few bytes to ~6 KB so packing sees short documents and documents
    longer than a row. Deterministic for a given Python.
    """
    code = [d for d in sources.embedded_corpus(include_docs=False)][:n]
    docs = []
    for i, d in enumerate(code):
        keep = [40, 300, 1500, 6000][i % 4]
        text = d.text[:keep]
        if i % 5 == 0:
            text += ENGLISH
        if i % 7 == 0:
            text += UNICODE
        docs.append(sources.Document(id=f"tiny/{i:03d}", text=text, source="tiny"))
    return tuple(docs)


def tiny_corpus():
    return iter(tiny_docs())
