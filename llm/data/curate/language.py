"""Language identification, offline, with py3langid (its naive-Bayes model ships in the wheel).

The step tags `metadata["language"]` and `metadata["language_score"]` (normalized probability)
and, when `languages` is set, removes other languages (`language_filtered`) and low-confidence
guesses (`language_low_confidence`). Documents of `skip_domains` (code by default) keep the
language they came with: a language identifier for prose says nothing useful about source code.
"""

from __future__ import annotations

import dataclasses
import functools

import gin

from llm.data.sources import Document

_IDENTIFIER = None


def identifier():
    """The process-wide py3langid identifier (loaded once, from the package's own model file)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def detect(text: str, max_chars: int = 1000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's first `max_chars` characters."""
    lang, score = identifier().classify(text[:max_chars])
    return lang, float(score)


def language(doc: Document, languages: tuple[str, ...] = (), min_score: float = 0.0,
             max_chars: int = 1000, skip_domains: tuple[str, ...] = ("code",)
             ) -> Document | str:
    """Tag (and optionally filter) a document's language."""
    if doc.metadata.get("domain") in skip_domains:
        return doc
    lang, score = detect(doc.text, max_chars)
    if languages and lang not in languages:
        return "language_filtered"
    if score < min_score:
        return "language_low_confidence"
    return dataclasses.replace(doc, metadata={**doc.metadata, "language": lang,
                                              "language_score": round(score, 4)})


@gin.configurable("langid")
def language_step(languages: tuple[str, ...] = (), min_score: float = 0.0, max_chars: int = 1000,
                  skip_domains: tuple[str, ...] = ("code",)):
    """Gin: `languages` to keep (empty: keep all, only tag), `min_score` confidence floor
    (FineWeb uses 0.65 for English), `max_chars` classified, `skip_domains` left untouched."""
    return functools.partial(language, languages=tuple(languages), min_score=min_score,
                             max_chars=max_chars, skip_domains=tuple(skip_domains))
