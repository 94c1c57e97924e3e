"""Heuristic quality filters: Gopher quality + repetition, C4, FineWeb, and source-code rules.

Each filter is a pure function `(doc, **thresholds) -> doc | reason` with the published
thresholds as defaults (Rae et al. 2021 "Gopher" appendix A; Raffel et al. 2020 "C4";
Penedo et al. 2024 "FineWeb"). Prose filters skip documents of `skip_domains` (code by default);
the code filter only looks at `domains` (code by default). The reason names the rule that fired,
e.g. `gopher_mean_word_length`, so the datasheet shows which rule removed what.

Words are whitespace-separated tokens (`str.split`), which is what the published rules count.
Each step also has `mode = "datatrove"`, which runs `dt_compat`'s port of datatrove 0.10.1's
filter instead (spaCy word splitting, datatrove's parameter names and switches): verdicts then
agree with datatrove's (tests/curate/test_datatrove_compat.py); the native mode is faster. The
differences are listed, each with an example, in docs/curation.md.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import gin
import numpy as np

from llm.config import ConfigError
from llm.data.sources import Document

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019")
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")
_BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25cf", "\u25e6", "\u25aa", "-", "*")
_ELLIPSIS = ("...", "\u2026")


def _applies(doc: Document, skip_domains: tuple[str, ...]) -> bool:
    return doc.metadata.get("domain") not in skip_domains


def gopher_quality(doc: Document, min_words: int = 50, max_words: int = 100_000,
                   min_mean_word_length: float = 3, max_mean_word_length: float = 10,
                   max_symbol_word_ratio: float = 0.1, max_bullet_lines_ratio: float = 0.9,
                   max_ellipsis_lines_ratio: float = 0.3, min_alpha_word_ratio: float = 0.8,
                   min_stop_words: int = 2, skip_domains: tuple[str, ...] = ("code",)
                   ) -> Document | str:
    """Gopher quality rules (word count, word length, symbols, bullets, ellipses, alphabetic
    words, stop words)."""
    if not _applies(doc, skip_domains):
        return doc
    text = doc.text
    words = text.split()
    n = len(words)
    if n < min_words:
        return "gopher_too_few_words"
    if n > max_words:
        return "gopher_too_many_words"
    mean_len = sum(map(len, words)) / n
    if mean_len < min_mean_word_length or mean_len > max_mean_word_length:
        return "gopher_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > max_symbol_word_ratio:
        return "gopher_symbol_word_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines) \
                > max_bullet_lines_ratio:
            return "gopher_bullet_lines"
        if sum(ln.rstrip().endswith(_ELLIPSIS) for ln in lines) / len(lines) \
                > max_ellipsis_lines_ratio:
            return "gopher_ellipsis_lines"
    alpha = len(_ALPHA_WORD.findall(text))
    if alpha / n < min_alpha_word_ratio:
        return "gopher_alpha_words"
    if len(STOP_WORDS.intersection(text.lower().split())) < min_stop_words:
        return "gopher_stop_words"
    return doc


def dup_counts(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier item, number of chars in them)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup, dup_chars


def _dup_stats(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier item, fraction of chars in them)."""
    dup, dup_chars = dup_counts(items)
    total_chars = sum(map(len, items))
    return dup / max(len(items), 1), dup_chars / max(total_chars, 1)


_NGRAM_K = (np.arange(1, 11, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def _word_ids(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(integer id per word, character length per word)."""
    ids: dict[str, int] = {}
    wid = np.fromiter((ids.setdefault(w, len(ids)) for w in words), np.uint64, len(words))
    lens = np.fromiter(map(len, words), np.int64, len(words))
    return wid * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(1), lens


def _ngram_keys(wid: np.ndarray, n: int) -> np.ndarray:
    m = len(wid) - n + 1
    keys = np.zeros(m, np.uint64)
    for t in range(n):
        keys = (keys ^ wid[t:t + m]) * _NGRAM_K[t]
    return keys


def _top_ngram_char_frac(wid: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Characters in the most frequent n-gram (times its count) over all word characters."""
    if len(wid) < n:
        return 0.0
    keys = _ngram_keys(wid, n)
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = first[top]
    return float(lens[start:start + n].sum() * counts[top]) / max(int(lens.sum()), 1)


def _dup_ngram_char_frac(wid: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Fraction of word characters covered by n-grams that occur more than once."""
    if len(wid) < n:
        return 0.0
    keys = _ngram_keys(wid, n)
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    dup = counts[inverse] > 1
    if not dup.any():
        return 0.0
    cover = np.zeros(len(wid) + 1, np.int64)
    starts = np.flatnonzero(dup)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(lens[covered].sum()) / max(int(lens.sum()), 1)


def gopher_repetition(doc: Document, max_dup_line_frac: float = 0.3,
                      max_dup_para_frac: float = 0.3, max_dup_line_char_frac: float = 0.2,
                      max_dup_para_char_frac: float = 0.2,
                      top_ngram_max_char_frac: tuple = ((2, 0.2), (3, 0.18), (4, 0.16)),
                      dup_ngram_max_char_frac: tuple = ((5, 0.15), (6, 0.14), (7, 0.13),
                                                        (8, 0.12), (9, 0.11), (10, 0.10)),
                      skip_domains: tuple[str, ...] = ("code",)) -> Document | str:
    """Gopher repetition rules: duplicate lines/paragraphs and repeated n-grams."""
    if not _applies(doc, skip_domains):
        return doc
    text = doc.text
    paras = [p for p in re.split(r"\n{2,}", text.strip()) if p]
    frac, chars = _dup_stats(paras)
    if frac > max_dup_para_frac:
        return "gopher_dup_paragraphs"
    if chars > max_dup_para_char_frac:
        return "gopher_dup_paragraph_chars"
    lines = [ln for ln in text.split("\n") if ln]
    frac, chars = _dup_stats(lines)
    if frac > max_dup_line_frac:
        return "gopher_dup_lines"
    if chars > max_dup_line_char_frac:
        return "gopher_dup_line_chars"
    wid, lens = _word_ids(text.lower().split())
    for n, limit in top_ngram_max_char_frac:
        if _top_ngram_char_frac(wid, lens, n) > limit:
            return f"gopher_top_{n}gram"
    for n, limit in dup_ngram_max_char_frac:
        if _dup_ngram_char_frac(wid, lens, n) > limit:
            return f"gopher_dup_{n}gram"
    return doc


_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
           "use of cookies", "use cookies")


def c4(doc: Document, min_words_per_line: int = 3, min_sentences: int = 5,
       filter_lorem_ipsum: bool = True, filter_javascript: bool = True,
       filter_curly_bracket: bool = True, filter_policy: bool = True,
       filter_no_terminal_punct: bool = True,
       skip_domains: tuple[str, ...] = ("code",)) -> Document | str | tuple[Document, dict]:
    """C4 rules: drop documents with lorem ipsum or `{`; drop lines without terminal punctuation
    (unless `filter_no_terminal_punct=False`, as FineWeb runs it), with fewer than
    `min_words_per_line` words, mentioning javascript or cookie/terms policies; drop the document
    if fewer than `min_sentences` sentences remain."""
    if not _applies(doc, skip_domains):
        return doc
    text = doc.text
    low = text.lower()
    if filter_lorem_ipsum and "lorem ipsum" in low:
        return "c4_lorem_ipsum"
    if filter_curly_bracket and "{" in text:
        return "c4_curly_bracket"
    kept, dropped = [], 0
    for line in text.split("\n"):
        s = line.strip()
        ls = s.lower()
        if (filter_no_terminal_punct and (not s.endswith(_TERMINAL) or s.endswith("..."))
                or len(s.split()) < min_words_per_line
                or (filter_javascript and "javascript" in ls)
                or (filter_policy and any(p in ls for p in _POLICY))):
            dropped += 1 if s else 0
            continue
        kept.append(line)
    new = "\n".join(kept)
    sentences = len(re.findall(r"[.!?]+(?:\s|$)", new))
    if sentences < min_sentences:
        return "c4_too_few_sentences"
    if dropped == 0:
        return doc
    return dataclasses.replace(doc, text=new), {"lines_removed": dropped}


def fineweb(doc: Document, min_line_punct_ratio: float = 0.12, max_short_line_ratio: float = 0.67,
            short_line_chars: int = 30, max_dup_line_char_ratio: float = 0.01,
            max_newline_word_ratio: float = 0.3, skip_domains: tuple[str, ...] = ("code",)
            ) -> Document | str:
    """FineWeb rules: share of lines ending in punctuation, share of short lines, characters in
    duplicated lines, and list-like documents (newlines per word)."""
    if not _applies(doc, skip_domains):
        return doc
    lines = [ln.strip() for ln in doc.text.split("\n") if ln.strip()]
    if not lines:
        return "fineweb_empty"
    if sum(ln.endswith(_TERMINAL) for ln in lines) / len(lines) < min_line_punct_ratio:
        return "fineweb_line_punct_ratio"
    if sum(len(ln) <= short_line_chars for ln in lines) / len(lines) > max_short_line_ratio:
        return "fineweb_short_line_ratio"
    _, dup_chars = _dup_stats(lines)
    if dup_chars > max_dup_line_char_ratio:
        return "fineweb_dup_line_chars"
    words = len(doc.text.split())
    if doc.text.count("\n") / max(words, 1) > max_newline_word_ratio:
        return "fineweb_list_ratio"
    return doc


_GENERATED = re.compile(r"auto-?generated|autogenerated|do not edit|generated by|"
                        r"@generated|generated automatically", re.IGNORECASE)


def code(doc: Document, max_line_length: int = 1000, max_mean_line_length: float = 100,
         min_alnum_fraction: float = 0.25, generated_marker_lines: int = 5,
         domains: tuple[str, ...] = ("code",)) -> Document | str:
    """Source-code rules (as in The Stack/StarCoder): longest line, mean line length, share of
    alphanumeric characters, and auto-generated markers in the first lines."""
    if doc.metadata.get("domain") not in domains:
        return doc
    text = doc.text
    lines = text.split("\n")
    if max(map(len, lines)) > max_line_length:
        return "code_max_line_length"
    if len(text) / len(lines) > max_mean_line_length:
        return "code_mean_line_length"
    if sum(c.isalnum() for c in text) / max(len(text), 1) < min_alnum_fraction:
        return "code_alnum_fraction"
    if generated_marker_lines and _GENERATED.search("\n".join(lines[:generated_marker_lines])):
        return "code_autogenerated"
    return doc


def _tuplify(x):
    return tuple(tuple(i) if isinstance(i, list) else i for i in x)


MODES = ("native", "datatrove")


def _step(native, compat_name: str, mode: str, step: str, kwargs: dict):
    if mode not in MODES:
        raise ConfigError(f"{step}.mode={mode!r}; choose one of {MODES}.")
    if mode == "datatrove":
        from llm.data.curate import dt_compat

        kwargs.setdefault("skip_domains", ("code",))
        return functools.partial(getattr(dt_compat, compat_name), **kwargs)
    return functools.partial(native, **kwargs)


@gin.configurable("gopher_quality")
def gopher_quality_step(mode: str = "native", **kwargs):
    """Gin: any keyword of `gopher_quality` (defaults are the Gopher paper's); `mode="datatrove"`
    takes `dt_compat.gopher_quality`'s keywords instead."""
    return _step(gopher_quality, "gopher_quality", mode, "gopher_quality", kwargs)


@gin.configurable("gopher_repetition")
def gopher_repetition_step(mode: str = "native", **kwargs):
    """Gin: any keyword of `gopher_repetition` (defaults are the Gopher paper's), or of
    `dt_compat.gopher_repetition` with `mode="datatrove"`."""
    for k in ("top_ngram_max_char_frac", "dup_ngram_max_char_frac", "top_n_grams",
              "dup_n_grams"):
        if k in kwargs:
            kwargs[k] = _tuplify(kwargs[k])
    return _step(gopher_repetition, "gopher_repetition", mode, "gopher_repetition", kwargs)


@gin.configurable("c4")
def c4_step(mode: str = "native", **kwargs):
    """Gin: any keyword of `c4` (defaults are C4's), or of `dt_compat.c4` with
    `mode="datatrove"`."""
    return _step(c4, "c4", mode, "c4", kwargs)


@gin.configurable("fineweb")
def fineweb_step(mode: str = "native", **kwargs):
    """Gin: any keyword of `fineweb` (defaults are FineWeb's), or of `dt_compat.fineweb` with
    `mode="datatrove"`."""
    return _step(fineweb, "fineweb", mode, "fineweb", kwargs)


@gin.configurable("code_quality")
def code_step(**kwargs):
    """Gin: any keyword of `code` (defaults follow The Stack / StarCoder)."""
    return functools.partial(code, **kwargs)
