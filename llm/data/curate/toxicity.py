"""Toxic/harmful language filter with a pluggable scorer.

The default scorer is offline: a word list (the one shipped in the `better-profanity` wheel,
minus words that are mostly benign in technical or everyday text, see `AMBIGUOUS`), matched on
lowercased tokens after undoing common leetspeak (`@`->a, `0`->o, `$`->s, ...), including its
multi-word entries. The score is the fraction of tokens that are listed; a document is removed as
`toxic` when the score reaches `threshold` and at least `min_hits` tokens are listed.

Any other scorer plugs in with `toxicity.scorer = "package.module:function"`, a function
`(text) -> float in [0, 1]` (e.g. a wrapper around a local classifier); its score is compared
with `threshold` alone. Measured quality of the default on the labelled set in
`tests/curate/test_toxicity.py` is reported in docs/curation.md.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re

import gin

from llm.config import ConfigError
from llm.data.sources import Document

# Listed words that are mostly benign in text we curate (code, docs, news, medicine, religion):
# flagging them costs precision far more than it buys recall.
AMBIGUOUS = frozenset([
    "len", "strip", "xxx", "xx", "stroke", "vulgar", "dummy", "meth", "kill", "slave", "guido",
    "slope", "ugly", "suck", "fat", "hell", "gai", "crap", "pot", "yury", "weed", "stupid",
    "screw", "racy", "foobar", "dong", "god", "gay", "sex", "sexy", "naked", "nude", "damn",
    "drunk", "bloody", "balls", "ball", "breast", "breasts", "junkie", "lust", "pee", "poop",
    "queer", "rape", "raped", "rapist", "butt", "fart", "kinky", "knob", "lesbian", "lesbians",
    "homo", "opiate", "opium", "pissed", "seduce", "sexual", "tit", "pube", "rectum", "scrotum",
    "semen", "vagina", "penis", "erotic", "escort", "testicle", "urine", "vomit", "nazi", "drug",
    "drugs", "wang", "willy", "beaver", "omg", "wtf", "lmao", "thrust", "trashy", "tramp",
    "tampon", "undies", "sperm",
    # clinical and anatomical terms, crime and history vocabulary (news, medicine, law):
    "anal", "anus", "areole", "clitoris", "crotch", "ejaculate", "ejaculated", "ejaculates",
    "ejaculating", "ejaculation", "enlargement", "erect", "erection", "foreskin", "glans", "gonad",
    "gonads", "hemp", "heroin", "herpes", "hiv", "hymen", "labia", "menses", "menstruate",
    "menstruation", "murder", "nipple", "nipples", "oral", "orally", "organ", "ovary", "ovum",
    "ovums", "pcp", "penetrate", "penetration", "penile", "pubic", "pubis", "rectal", "rectus",
    "sniper", "testes", "testis", "uterus", "valium", "viagra", "virgin", "vodka", "vulva", "womb",
    "raping", "masturbate", "masturbating", "masturbation", "cum", "hitler", "nazism", "reich",
    "uzi", "napalm", "pornography", "rum", "pawn", "organ", "revue", "seaman", "seamen", "sandbar",
])
# Insults and obfuscations the shipped list lacks.
EXTRA = frozenset([
    "idiot", "idiots", "imbecile", "imbeciles", "cretin", "cretins", "asshat", "asshats",
    "dipshit", "dipshits", "horseshit", "kys", "fck", "fcking", "biatch", "halfwit", "scumbag",
    "shitbag", "dumbfuck", "fuckwits", "bullshit",
])
_LEET = str.maketrans({"@": "a", "4": "a", "0": "o", "1": "i", "!": "i", "3": "e", "$": "s",
                       "5": "s", "7": "t", "+": "t"})
_TOKEN = re.compile(r"[a-z*]+")
_LIST: tuple[frozenset, frozenset] | None = None


def wordlist() -> tuple[frozenset, frozenset]:
    """(single words, two-word phrases) of the default list."""
    global _LIST
    if _LIST is None:
        import better_profanity

        path = os.path.join(os.path.dirname(better_profanity.__file__), "profanity_wordlist.txt")
        with open(path, encoding="utf-8") as f:
            entries = [ln.strip().lower() for ln in f if ln.strip()]
        words = (frozenset(e for e in entries if " " not in e) | EXTRA) - AMBIGUOUS
        words |= frozenset(w + "s" for w in words if len(w) > 2) - AMBIGUOUS  # plurals
        pairs = frozenset(tuple(e.split()[:2]) for e in entries if e.count(" ") == 1)
        _LIST = (words, pairs)
    return _LIST


_SPELLED = re.compile(r"\b(?:[a-z][ .\-_]){2,}[a-z]\b")     # f u c k, s.h.i.t, p-r-i-c-k
_SPELLED_HINT = re.compile(r"[ .\-_][a-z][ .\-_][a-z][ .\-_]")
_REPEAT = re.compile(r"([a-z])\1{2,}")
_TRIPLES = tuple(c * 3 for c in "abcdefghijklmnopqrstuvwxyz")                            # fuuuuck


def _obfuscated(t: str, words: frozenset) -> bool:
    """A token is listed after undoing masks (f*ck) or letter repeats (fuuuck)."""
    if "*" in t:
        pat = re.compile(t.replace("*", "[a-z]") + "$")
        return any(len(w) == len(t) and pat.match(w) for w in words)
    if _REPEAT.search(t):
        return _REPEAT.sub(r"\1", t) in words or _REPEAT.sub(r"\1\1", t) in words
    return False


def wordlist_score(text: str) -> tuple[float, int]:
    """(fraction of tokens that are listed, number of listed tokens).

    Tokens are lowercase letter runs after undoing leetspeak and letter spacing."""
    words, pairs = wordlist()
    low = text.lower().translate(_LEET)
    if _SPELLED_HINT.search(low):
        low = _SPELLED.sub(lambda m: re.sub(r"[ .\-_]", "", m.group()), low)
    toks = [t.strip("*") for t in _TOKEN.findall(low)]
    if not toks:
        return 0.0, 0
    hits = sum(1 for t in toks if t in words)
    if "*" in low or any(t in low for t in _TRIPLES):  # masks and letter repeats: the slow path
        extra = {t for t in set(toks) if t not in words and _obfuscated(t, words)}
        hits += sum(1 for t in toks if t in extra) if extra else 0
    hits += sum(1 for a, b in zip(toks, toks[1:]) if (a, b) in pairs)
    return hits / len(toks), hits


def _load(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"toxicity.scorer={spec!r}: write it as 'package.module:function'.")
    return getattr(importlib.import_module(module), name)


def toxicity(doc: Document, scorer: str = "wordlist", threshold: float = 0.005,
             min_hits: int = 2, tag_only: bool = False) -> Document | str:
    """Remove (or with `tag_only`, just tag `metadata["toxicity"]`) toxic documents."""
    if scorer == "wordlist":
        score, hits = wordlist_score(doc.text)
        toxic = score >= threshold and hits >= min_hits
    else:
        score = float(_load(scorer)(doc.text))
        toxic = score >= threshold
    if toxic and not tag_only:
        return "toxic"
    if tag_only:
        return dataclasses.replace(doc, metadata={**doc.metadata, "toxicity": round(score, 5)})
    return doc


@gin.configurable("toxicity")
def toxicity_step(scorer: str = "wordlist", threshold: float = 0.005, min_hits: int = 2,
                  tag_only: bool = False):
    """Gin: `scorer` ('wordlist' or 'module:function'), `threshold` on the score, `min_hits`
    listed tokens needed by the word-list scorer, `tag_only` to tag instead of remove."""
    if scorer != "wordlist":
        _load(scorer)  # fail now, in the main process, with a clear message
    return functools.partial(toxicity, scorer=scorer, threshold=threshold, min_hits=min_hits,
                             tag_only=tag_only)
