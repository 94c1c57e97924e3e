"""Normalize/scrub: Unicode NFC, control characters, whitespace, empty documents.

Invalid UTF-8 is handled where bytes are decoded (`readers.decode`): repaired to U+FFFD when rare,
removed as `invalid_utf8` otherwise. This step works on decoded text.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata

import gin

from llm.data.sources import Document

# C0 controls except \t \n, DEL, C1 controls, and zero-width/bidi formatting characters that
# carry no text. \r is handled as a line ending.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str, *, nfc: bool = True, strip_control: bool = True,
                   collapse_spaces: bool = True) -> str:
    """The normalized text (see `normalize`)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if nfc and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if strip_control:
        text = _CONTROL.sub("", text)
    if collapse_spaces:
        text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n ")


def normalize(doc: Document, nfc: bool = True, strip_control: bool = True,
              collapse_spaces: bool = True, keep_indent_domains: tuple[str, ...] = ("code",)
              ) -> Document | str | tuple[Document, dict]:
    """NFC, control characters removed, runs of spaces collapsed (not in code, whose indentation
    matters), trailing spaces and blank-line runs trimmed. Removes `empty_text` documents."""
    collapse = collapse_spaces and doc.metadata.get("domain") not in keep_indent_domains
    text = normalize_text(doc.text, nfc=nfc, strip_control=strip_control,
                          collapse_spaces=collapse)
    if not text.strip():
        return "empty_text"
    if text == doc.text:
        return doc
    if text == doc.text.strip():  # only surrounding whitespace trimmed: not worth counting
        return dataclasses.replace(doc, text=text)
    return dataclasses.replace(doc, text=text), {"changed": 1}


@gin.configurable("normalize")
def normalize_step(nfc: bool = True, strip_control: bool = True, collapse_spaces: bool = True,
                   keep_indent_domains: tuple[str, ...] = ("code",)):
    """The gin-configured normalize step (defaults: everything on; code keeps indentation)."""
    return functools.partial(normalize, nfc=nfc, strip_control=strip_control,
                             collapse_spaces=collapse_spaces,
                             keep_indent_domains=tuple(keep_indent_domains))
