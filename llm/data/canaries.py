"""Secret canaries for memorization audits (Carlini et al. 2019, "The Secret Sharer").

`prepare` reads the canaries as one more input unit of the corpus (`unit`). With canaries enabled
by gin

    canaries.counts = [1, 4, 16, 64]     # repetitions; one group of canaries per count
    canaries.per_count = 3               # distinct canaries per repetition count
    canaries.length = 9                  # secret digits: the randomness space R has 10**9 members
    canaries.seed = 0

each canary is one line of text, a fixed prefix naming the canary and a uniformly random secret,

    # The secret code of qhzvbnle is 281265017

inserted `count` times as separate training documents (ids `canary/<name>/<j>`, source `canary`,
always routed to the training split). They come after the corpus's own documents; the training
pipeline's global shuffle spreads them through the epoch. Every canary (prefix, secret, count) is
written to `canaries.json` beside `dataset.json` before the corpus is scanned; that file is the
unit `prepare` reads them from (so the fingerprint, both passes and the Beam runner see them like
any input file), and the memorization audit (`llm.eval.memorization`) reads it too. The tokenizer splits digits
(`split_digits=True`), so every secret is `length` single-digit tokens whatever its value, and all
members of R are scored on equal terms.

Without `canaries.counts` (the default) nothing is inserted and a stale `canaries.json` is removed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence

import gin
import numpy as np

from llm.data.sources import DataError, Document, Unit

CANARIES_JSON = "canaries.json"
ALPHABET = "0123456789"
_NAME_LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "# The secret code of {name} is "


@dataclasses.dataclass(frozen=True)
class Canary:
    """One canary: `prefix + secret` is its text, repeated `count` times in the training split."""

    name: str
    prefix: str
    secret: str
    count: int

    @property
    def text(self) -> str:
        return self.prefix + self.secret + "\n"


@dataclasses.dataclass(frozen=True)
class CanarySpec:
    """What `canaries.*` asks for: `per_count` canaries at each repetition count in `counts`."""

    counts: tuple[int, ...]
    per_count: int = 1
    length: int = 9
    seed: int = 0

    @property
    def space_size(self) -> int:
        """|R|: the number of possible secrets."""
        return len(ALPHABET) ** self.length

    def settings(self) -> dict:
        return {"counts": list(self.counts), "per_count": self.per_count, "length": self.length,
                "seed": self.seed, "template": TEMPLATE, "alphabet": ALPHABET}


@gin.configurable("canaries")
def spec(counts: Sequence[int] = (), per_count: int = 1, length: int = 9,
         seed: int = 0) -> CanarySpec | None:
    """The configured canaries, or None when `counts` is empty (no canaries)."""
    counts = tuple(int(c) for c in counts)
    if not counts:
        return None
    if any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise DataError(f"canaries.counts={list(counts)} must be distinct repetition counts >= 1 "
                        "(e.g. [1, 4, 16, 64]).")
    if per_count < 1:
        raise DataError(f"canaries.per_count={per_count} must be >= 1.")
    if not 4 <= length <= 18:
        raise DataError(f"canaries.length={length} must be between 4 and 18 digits (|R| = "
                        "10**length; too short and secrets collide with chance, too long and "
                        "nothing is measurable).")
    return CanarySpec(counts, per_count, length, seed)


def make_canaries(s: CanarySpec) -> list[Canary]:
    """`per_count` canaries per count, names and secrets drawn from `s.seed` (distinct names)."""
    rng = np.random.default_rng(s.seed)
    out, names = [], set()
    for count in s.counts:
        for _ in range(s.per_count):
            name = "".join(rng.choice(list(_NAME_LETTERS), 8))
            while name in names:
                name = "".join(rng.choice(list(_NAME_LETTERS), 8))
            names.add(name)
            secret = "".join(rng.choice(list(ALPHABET), s.length))
            out.append(Canary(name, TEMPLATE.format(name=name), secret, count))
    return out


def random_secrets(n: int, length: int, seed: int) -> list[str]:
    """`n` secrets drawn uniformly (with replacement) from R = ALPHABET**length."""
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, len(ALPHABET), size=(n, length))
    return ["".join(ALPHABET[d] for d in row) for row in digits]


SOURCE = "canary"  # Document.source of every canary; `prepare` routes these to the train split


def unit(data_dir: str, s: CanarySpec | None) -> Unit | None:
    """Write `canaries.json` for `s` (e.g. the gin-configured `spec()`) and return the input unit
    that reads the canaries back as training documents; None without canaries (a stale
    `canaries.json` is removed)."""
    path = os.path.join(data_dir, CANARIES_JSON)
    if s is None:
        if os.path.exists(path):
            os.remove(path)
        return None
    write(data_dir, s, make_canaries(s))
    return Unit(path=path, kind="canaries")


def read_documents(path: str) -> Iterator[Document]:
    """The documents of a `canaries.json`: every canary `count` times, in recorded order."""
    with open(path) as f:
        record = json.load(f)
    for c in (Canary(**c) for c in record["canaries"]):
        for j in range(c.count):
            yield Document(id=f"canary/{c.name}/{j}", text=c.text, source=SOURCE,
                           metadata={"canary": c.name, "count": c.count})


def write(data_dir: str, s: CanarySpec, canaries: list[Canary]) -> str:
    """Atomically writes `canaries.json` (settings, |R| and every canary)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, CANARIES_JSON)
    record = {"settings": s.settings(), "space_size": s.space_size,
              "space_size_log2": math.log2(s.space_size),
              "num_documents": sum(c.count for c in canaries),
              "canaries": [dataclasses.asdict(c) for c in canaries]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    return path


def load(data_dir: str) -> tuple[CanarySpec, list[Canary]]:
    """The canaries recorded in `data_dir/canaries.json` (DataError if there are none)."""
    path = os.path.join(data_dir, CANARIES_JSON)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: the data was prepared without canaries. Prepare "
                        "it with `--gin_param='canaries.counts=[1, 4, 16, 64]'`.")
    with open(path) as f:
        record = json.load(f)
    st = record["settings"]
    s = CanarySpec(tuple(st["counts"]), st["per_count"], st["length"], st["seed"])
    return s, [Canary(**c) for c in record["canaries"]]
