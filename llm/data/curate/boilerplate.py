"""Boilerplate lines: lines repeated across many documents of one source are removed.

Navigation bars, cookie banners, "Share this:" and licence headers repeat verbatim across a
site's pages. A line is boilerplate when at least `max(min_docs, min_fraction * documents of the
source)` documents of the same source contain it. Counting is exact: each unit reports the
64-bit hashes of its documents' distinct short lines, per source; the global pass counts them
with `np.unique` (8 bytes per distinct line per document). Only lines of at most `max_line_chars`
characters are counted, and only documents of `domains` are touched (default: web; code repeats
`import os` legitimately).
"""

from __future__ import annotations

import dataclasses
import hashlib

import gin
import numpy as np

from llm.data.sources import Document


@gin.configurable("boilerplate")
@dataclasses.dataclass(frozen=True)
class BoilerplateConfig:
    """min_docs / min_fraction: how many documents of a source must share a line.
    max_line_chars: longer lines are never boilerplate. domains: documents considered."""

    min_docs: int = 5
    min_fraction: float = 0.01
    max_line_chars: int = 200
    domains: tuple[str, ...] = ("web",)


def _h(line: str) -> int:
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def _lines(doc: Document, cfg: BoilerplateConfig) -> set[int]:
    return {_h(s) for s in (ln.strip() for ln in doc.text.split("\n"))
            if s and len(s) <= cfg.max_line_chars}


def analyze(docs: list[tuple[int, Document]], cfg: BoilerplateConfig = BoilerplateConfig()
            ) -> dict:
    """{source: (documents, uint64 array of line hashes, one entry per document containing it)}."""
    per: dict[str, list] = {}
    for _, d in docs:
        if d.metadata.get("domain") not in cfg.domains:
            continue
        n, hashes = per.setdefault(d.source, [0, []])
        per[d.source][0] = n + 1
        hashes.extend(_lines(d, cfg))
    return {s: (n, np.array(h, np.uint64)) for s, (n, h) in per.items()}


def combine(partials, cfg: BoilerplateConfig = BoilerplateConfig()) -> dict:
    """{source: sorted hashes of boilerplate lines}."""
    docs: dict[str, int] = {}
    hashes: dict[str, list] = {}
    for _, part in partials:
        for s, (n, h) in part.items():
            docs[s] = docs.get(s, 0) + n
            hashes.setdefault(s, []).append(h)
    out = {}
    for s, hs in hashes.items():
        u, c = np.unique(np.concatenate(hs), return_counts=True)
        need = max(cfg.min_docs, cfg.min_fraction * docs[s])
        out[s] = u[c >= need]
    return out


def apply(o: int, doc: Document, state: dict, cfg: BoilerplateConfig = BoilerplateConfig()
          ) -> Document | str | tuple[Document, dict]:
    """Drop the document's boilerplate lines; `boilerplate_only` if nothing else is left."""
    bad = state.get(doc.source)
    if bad is None or len(bad) == 0 or doc.metadata.get("domain") not in cfg.domains:
        return doc
    kept, dropped = [], 0
    for line in doc.text.split("\n"):
        s = line.strip()
        if s and len(s) <= cfg.max_line_chars:
            h = np.uint64(_h(s))
            i = np.searchsorted(bad, h)
            if i < len(bad) and bad[i] == h:
                dropped += 1
                continue
        kept.append(line)
    if not dropped:
        return doc
    text = "\n".join(kept).strip()
    if not text:
        return "boilerplate_only"
    return dataclasses.replace(doc, text=text), {"lines_removed": dropped}
