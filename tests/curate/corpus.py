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
