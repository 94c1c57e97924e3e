"""datatrove-compatible Gopher, C4 and FineWeb filters (verdicts as datatrove 0.10.1's).

Select with `<filter>.mode = "datatrove"` in gin (see `quality.py`); the parameters are then
datatrove's own (`GopherQualityFilter`, `GopherRepetitionFilter`, `C4QualityFilter`,
`FineWebQualityFilter`), with its defaults. What makes the verdicts differ from the faster
native filters, each ported here as datatrove does it:
  * words: spaCy's rule-based English tokenizer (`spacy.blank("en")`, no model), so punctuation
    marks are words of their own ("end." -> "end", "."), where the native filters split on
    whitespace;
  * Gopher quality: length and mean word length count only words with a non-punctuation
    character; bullets are only "\u2022" and "-"; blank lines count as lines;
  * Gopher repetition: n-grams are of spaCy words; fractions are over all characters of the text;
    duplicated n-grams are counted with datatrove's greedy skip-ahead scan;
  * C4: Wikipedia citations ("[1]", "[edit]") are removed before the punctuation check, lines with
    a word over 1000 characters are dropped, sentences are counted per kept line with spaCy's
    sentencizer, and `filter_no_terminal_punct` switches the terminal-punctuation rule off;
  * FineWeb: its terminal punctuation is datatrove's set of 159 marks of all scripts.
The constants below are datatrove's (Apache-2.0), copied so that datatrove need not be installed.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import numpy as np

from llm.config import ConfigError
from llm.data.curate.quality import dup_counts
from llm.data.sources import Document

TERMINAL_PUNCTUATION = frozenset(
    '!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e'
    '\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9'
    '\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d'
    '\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54'
    '\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d'
    '\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56'
    '\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87'
    '\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1'
    '\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df'
    '\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2'
    '\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf'
    '\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7'
    '\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42'
    '\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43'
    '\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016e98'
    '\U0001bc9f\U0001da88')
PUNCTUATION = ("!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d"
               "\uff0c\u3011\uff1b+^]~"
               "\u201c\u300a\u201e';\u2019{|\u2236\u00b4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\u00ab"
               "\u3009,><\u300b)?\uff09\u3002\u2026@_.\"}\u25ba\u00bb"
               + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160))
                                   for x in range(a, b)))))
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_C4_END = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")


@functools.lru_cache(maxsize=1)
def _nlp():
    try:
        import spacy
    except ImportError:
        raise ImportError("The datatrove-compatible filters need spaCy (pip install "
                          "spacy==3.8.18; no model is downloaded).") from None
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


def _doc(text: str):
    nlp = _nlp()
    nlp.max_length = len(text) + 10
    return nlp(text)


def words(text: str) -> list[str]:
    """datatrove's English word split: spaCy tokens, stripped, empty ones dropped."""
    return [t for t in (tok.text.strip() for tok in _doc(text)) if t]


def sentence_count(text: str) -> int:
    """Number of parts datatrove's `split_into_sentences` returns."""
    return max(len(list(_doc(text).sents)), 1)


def gopher_quality(doc: Document, min_doc_words: int | None = 50,
                   max_doc_words: int | None = 100000, min_avg_word_length: int | None = 3,
                   max_avg_word_length: int | None = 10, max_symbol_word_ratio: float | None = 0.1,
                   max_bullet_lines_ratio: float | None = 0.9,
                   max_ellipsis_lines_ratio: float | None = 0.3,
                   max_non_alpha_words_ratio: float | None = 0.8, min_stop_words: int | None = 2,
                   stop_words: tuple[str, ...] | None = None,
                   skip_domains: tuple[str, ...] = ()) -> Document | str:
    """datatrove's GopherQualityFilter."""
    if doc.metadata.get("domain") in skip_domains:
        return doc
    text = doc.text
    ws = words(text)
    n_words = len(ws)
    non_symbol = [w for w in ws if any(ch not in PUNCTUATION_SET for ch in w)]
    n = len(non_symbol)
    if min_doc_words and n < min_doc_words:
        return "gopher_short_doc"
    if max_doc_words and n > max_doc_words:
        return "gopher_long_doc"
    avg = float(np.mean([len(w) for w in non_symbol]))
    if min_avg_word_length and avg < min_avg_word_length:
        return "gopher_below_avg_threshold"
    if max_avg_word_length and avg > max_avg_word_length:
        return "gopher_above_avg_threshold"
    if max_symbol_word_ratio and text.count("#") / n_words > max_symbol_word_ratio:
        return "gopher_too_many_hashes"
    if max_symbol_word_ratio and (text.count("...") + text.count("\u2026")) / n_words \
            > max_symbol_word_ratio:
        return "gopher_too_many_ellipsis"
    lines = text.splitlines()
    if max_bullet_lines_ratio and sum(s.lstrip().startswith(("\u2022", "-")) for s in lines) \
            / len(lines) > max_bullet_lines_ratio:
        return "gopher_too_many_bullets"
    if max_ellipsis_lines_ratio and sum(s.rstrip().endswith(("...", "\u2026")) for s in lines) \
            / len(lines) > max_ellipsis_lines_ratio:
        return "gopher_too_many_end_ellipsis"
    if max_non_alpha_words_ratio and sum(any(c.isalpha() for c in w) for w in ws) / n_words \
            < max_non_alpha_words_ratio:
        return "gopher_below_alpha_threshold"
    stops = STOP_WORDS if stop_words is None else frozenset(stop_words)
    if min_stop_words and len(stops.intersection(ws)) < min_stop_words:
        return "gopher_enough_stop_words"
    return doc


def _all_dup_chars(ws: list[str], n: int) -> int:
    seen: set[str] = set()
    chars = i = 0
    while i < len(ws) - n + 1:
        g = "".join(ws[i:i + n])
        if g in seen:
            chars += len(g)
            i += n
        else:
            seen.add(g)
            i += 1
    return chars


def gopher_repetition(doc: Document, dup_line_frac: float | None = 0.3,
                      dup_para_frac: float | None = 0.3, dup_line_char_frac: float | None = 0.2,
                      dup_para_char_frac: float | None = 0.2,
                      top_n_grams: tuple = ((2, 0.2), (3, 0.18), (4, 0.16)),
                      dup_n_grams: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                            (9, 0.11), (10, 0.10)),
                      skip_domains: tuple[str, ...] = ()) -> Document | str:
    """datatrove's GopherRepetitionFilter."""
    if doc.metadata.get("domain") in skip_domains:
        return doc
    text = doc.text
    if not text:
        return "gopher_empty"
    paras = re.split(r"\n{2,}", text.strip())
    n, chars = dup_counts(paras)
    if dup_para_frac and n / len(paras) > dup_para_frac:
        return "gopher_dup_para_frac"
    if dup_para_char_frac and chars / len(text) > dup_para_char_frac:
        return "gopher_dup_para_char_frac"
    lines = re.split("\n+", text)
    n, chars = dup_counts(lines)
    if dup_line_frac and n / len(lines) > dup_line_frac:
        return "gopher_dup_line_frac"
    if dup_line_char_frac and chars / len(text) > dup_line_char_frac:
        return "gopher_dup_line_char_frac"
    ws = words(text)
    for k, frac in top_n_grams:
        grams = [" ".join(ws[i:i + k]) for i in range(len(ws) - k + 1)]
        if not grams:
            continue
        top, count = Counter(grams).most_common(1)[0]
        if len(top) * count / len(text) > frac:
            return f"gopher_top_{k}_gram"
    for k, frac in dup_n_grams:
        if _all_dup_chars(ws, k) / len(text) > frac:
            return f"gopher_duplicated_{k}_n_grams"
    return doc


def c4(doc: Document, split_paragraph: bool = True, remove_citations: bool = True,
       filter_no_terminal_punct: bool = True, min_num_sentences: int = 5,
       min_words_per_line: int = 3, max_word_length: int = 1000, filter_lorem_ipsum: bool = True,
       filter_javascript: bool = True, filter_curly_bracket: bool = True,
       filter_policy: bool = True, skip_domains: tuple[str, ...] = ()
       ) -> Document | str | tuple[Document, dict]:
    """datatrove's C4QualityFilter (`split_paragraph=False` is not supported)."""
    if not split_paragraph:
        raise ConfigError("c4.split_paragraph=False (sentence mode) is not supported in "
                         "datatrove mode; keep the default True.")
    if doc.metadata.get("domain") in skip_domains:
        return doc
    sentences = 0
    kept: list[str] = []
    lines = doc.text.splitlines()
    for line in lines:
        line = line.strip()
        ws = line.split()
        if max_word_length != -1 and any(len(w) > max_word_length for w in ws):
            continue
        if remove_citations:
            line = _CITATION.sub("", line)
        if filter_no_terminal_punct and (not line.endswith(_C4_END) or line.endswith("...")):
            continue
        if len(ws) < min_words_per_line:
            continue
        low = line.lower()
        if filter_lorem_ipsum and "lorem ipsum" in low:
            return "c4_lorem_ipsum"
        if filter_javascript and "javascript" in low:
            continue
        if filter_curly_bracket and "{" in line:
            return "c4_curly_bracket"
        if filter_policy and any(p in low for p in _POLICY):
            continue
        if min_num_sentences != -1:
            sentences += sentence_count(line)
        kept.append(line)
    if sentences < min_num_sentences:
        return "c4_too_few_sentences"
    new = "\n".join(kept).strip()
    if new == doc.text:
        return doc
    return Document(doc.id, new, doc.source, doc.metadata), {"lines_removed": len(lines) -
                                                              len(kept)}


def fineweb(doc: Document, line_punct_thr: float = 0.12, line_punct_exclude_zero: bool = False,
            stop_chars: tuple[str, ...] | None = None, short_line_thr: float = 0.67,
            short_line_length: int = 30, char_duplicates_ratio: float = 0.01,
            new_line_ratio: float = 0.3, skip_domains: tuple[str, ...] = ()) -> Document | str:
    """datatrove's FineWebQualityFilter."""
    if doc.metadata.get("domain") in skip_domains:
        return doc
    stops = tuple(TERMINAL_PUNCTUATION) if stop_chars is None else tuple(stop_chars)
    lines = [ln for ln in doc.text.split("\n") if ln.strip() != ""]
    if not lines:
        return "fineweb_empty"
    ratio = sum(1 for ln in lines if ln.endswith(stops)) / len(lines)
    if ratio < line_punct_thr and not (ratio == 0 and line_punct_exclude_zero):
        return "fineweb_line_punct_ratio"
    if sum(1 for ln in lines if len(ln) <= short_line_length) / len(lines) > short_line_thr:
        return "fineweb_short_line_ratio"
    if dup_counts(lines)[1] / len(doc.text.replace("\n", "")) > char_duplicates_ratio:
        return "fineweb_char_dup_ratio"
    if doc.text.count("\n") / len(words(doc.text)) > new_line_ratio:
        return "fineweb_list_ratio"
    return doc
