"""Small synthetic corpora for the curation tests (built at test time, seeded)."""

from __future__ import annotations

import gzip
import json
import os
import random

_SYL = ["ka", "to", "mi", "ren", "sal", "vo", "dra", "len", "shu", "pe", "bor", "ti", "nax",
        "qui", "lo", "mar", "fen", "ul", "gri", "zo", "ber", "an", "es", "it", "on", "ha"]
_FRAMES = [
    "The {0} and the {1} have {2} with {3} near {4}.",
    "A {0} was {1} by the {2} of {3}, and it {4} again.",
    "Some {0} said that {1} {2} every {3} before the {4}.",
    "In the {0} of {1}, we {2} {3} because {4} matters.",
    "It is {0} to {1} a {2} when the {3} is {4}.",
]


def vocab(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4))))
    return sorted(out)


def prose(rng: random.Random, words: list[str], sentences: int = 12, per_line: int = 3) -> str:
    """Web-like prose that passes the Gopher, C4 and FineWeb rules."""
    lines, cur = [], []
    for _ in range(sentences):
        s = rng.choice(_FRAMES).format(*(rng.choice(words) for _ in range(5)))
        cur.append(s[0].upper() + s[1:])
        if len(cur) == per_line:
            lines.append(" ".join(cur))
            cur = []
    if cur:
        lines.append(" ".join(cur))
    return "\n".join(lines)


def mutate(rng: random.Random, text: str, words: list[str], p: float) -> str:
    """Replace each word with probability p (keeps line structure)."""
    return "\n".join(" ".join(rng.choice(words) if rng.random() < p else w
                              for w in line.split(" ")) for line in text.split("\n"))


def write_jsonl(path: str, records: list[dict], gz: bool = False) -> str:
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def web_corpus(tmp: str, n: int = 48, files: int = 3, seed: int = 0) -> str:
    """JSONL files of web-like documents with planted exact and near duplicates, boilerplate
    lines and PII. Returns the glob."""
    rng = random.Random(seed)
    words = vocab(seed=seed)
    docs = [prose(rng, words) for _ in range(n)]
    docs[5] = docs[3]                                  # exact duplicate
    docs[7] = docs[2].replace(" the ", " a ", 2)       # near duplicate (2 words differ)
    docs[9] = docs[9] + "\nWrite to jane.doe@example.com or call +44 20 7946 0958 today."
    for i in range(0, n, 2):                           # boilerplate navigation line
        docs[i] = "Home | About us | Contact | Subscribe now\n" + docs[i]
    os.makedirs(tmp, exist_ok=True)
    per = (n + files - 1) // files
    for f in range(files):
        write_jsonl(os.path.join(tmp, f"web-{f}.jsonl"),
                    [{"text": d, "url": f"https://example.org/{f}/{i}"}
                     for i, d in enumerate(docs[f * per:(f + 1) * per])])
    return os.path.join(tmp, "web-*.jsonl")


_ENGLISH_TEXT = ("the of and to a in is that for it as was with be by on not he this are or his "
                 "from at which but have an they you were her she there been one all we their "
                 "has would when "
                 "if so no will more can who its them than into out about up what do said")
_ENGLISH = _ENGLISH_TEXT.split()


def _line(rng: random.Random, words: list[str]) -> str:
    """One line of a web page, of a randomly chosen kind."""
    def sent(k: int) -> str:
        ws = [rng.choice(_ENGLISH) if rng.random() < 0.45 else rng.choice(words)
              for _ in range(k)]
        s = " ".join(ws)
        if rng.random() < 0.15:
            s = s.replace(" is ", " isn't ", 1).replace(" it ", " it's ", 1)
        if rng.random() < 0.1:
            s += f", {rng.randint(1, 999)}.{rng.randint(0, 99)}% of {rng.choice(words)}"
        return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?", ".\"", "..."])
    kind = rng.random()
    if kind < 0.45:
        return " ".join(sent(rng.randint(4, 18)) for _ in range(rng.randint(1, 4)))
    if kind < 0.55:
        return rng.choice(["- ", "\u2022 ", "* ", "1. "]) + sent(rng.randint(2, 8))[:-1]
    if kind < 0.62:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))    # menu item
    if kind < 0.67:
        return sent(rng.randint(3, 10))[:-1] + rng.choice(["...", "\u2026", " [1].", " [edit]"])
    if kind < 0.72:
        return " | ".join(str(rng.randint(0, 9999)) for _ in range(rng.randint(2, 6)))
    if kind < 0.75:
        return rng.choice(["This site uses cookies to improve your experience.",
                           "Please enable JavaScript to view the comments.",
                           "Read our privacy policy and terms of use.",
                           "#" + " #".join(rng.choice(words) for _ in range(rng.randint(1, 6)))])
    if kind < 0.78:
        return rng.choice(["Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
                           "function f(x) { return x + 1; }",
                           "\u3053\u308c\u306f\u6587\u3067\u3059\u3002\u300c\u5f15\u7528\u300d",
                           "What?! Really\u2026 no\u203d", "Done \u2014 see \u00abthis\u00bb."])
    if kind < 0.85:
        return sent(rng.randint(20, 60))
    return rng.choice(words).capitalize() + " " + rng.choice(words) + ":"


def varied_web_docs(n: int, seed: int = 0) -> list[str]:
    """Web-like pages mixing prose, lists, menus, ellipses, tables, hashtags, cookie notices,
    code, citations, non-Latin punctuation, repeated lines and paragraphs, and documents near the
    rules' thresholds (few words, few sentences): a corpus on which filter verdicts vary."""
    rng = random.Random(seed)
    words = vocab(seed=seed)
    docs = []
    for _ in range(n):
        lines = [_line(rng, words) for _ in range(rng.choice([2, 4, 6, 10, 20, 40]))]
        r = rng.random()
        if r < 0.15:                                   # repeated lines
            lines += rng.sample(lines, k=max(1, len(lines) // rng.randint(2, 5)))
        elif r < 0.25:                                 # repeated paragraph block
            lines += [""] + lines[: rng.randint(1, 4)]
        elif r < 0.3:                                  # a repeated phrase
            phrase = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            lines.append(" ".join([phrase] * rng.randint(3, 12)) + ".")
        sep = "\n\n" if rng.random() < 0.3 else "\n"
        docs.append(sep.join(lines))
    return docs
