"""The step registry: names usable in `curate.steps`, and how each is built from gin.

Two kinds of steps:
  * map steps look at one document: `fn(doc) -> doc | reason | (doc, change_counts)`;
  * global steps need the whole corpus: `analyze` each unit, `combine` the partial results
    (in one place), then `apply(ordinal, doc, state)` to each document.
Both runners (local, Beam) use exactly these functions, so they produce the same output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from llm.data.curate import (
    balance,
    boilerplate,
    decontam,
    exact_dedup,
    language,
    minhash,
    normalize,
    pii,
    quality,
    toxicity,
)
from llm.data.curate.records import CurationError

MAP_STEPS: dict[str, Callable[[], Callable]] = {
    "normalize": normalize.normalize_step,
    "gopher_quality": quality.gopher_quality_step,
    "gopher_repetition": quality.gopher_repetition_step,
    "c4": quality.c4_step,
    "fineweb": quality.fineweb_step,
    "code_quality": quality.code_step,
    "langid": language.language_step,
    "toxicity": toxicity.toxicity_step,
    "pii": pii.pii_step,
    "decontam": decontam.decontam_step,
}


@dataclasses.dataclass(frozen=True)
class GlobalStep:
    """A corpus-wide step: analyze(unit docs) -> partial; combine([(unit, partial)]) -> state;
    apply(ordinal, doc, state) -> doc | reason | (doc, changes) | [docs]."""

    name: str
    analyze: Callable[[list], Any]
    combine: Callable[[list], Any]
    apply: Callable[[int, Any, Any], Any]
    config: Any = None  # the step's config object (the Beam runner's scalable combines use it)


def _exact() -> GlobalStep:
    cfg = exact_dedup.exact_dedup_config()
    return GlobalStep("exact_dedup",
                      functools.partial(exact_dedup.analyze, lowercase=cfg["lowercase"]),
                      functools.partial(exact_dedup.combine, partitions=cfg["partitions"]),
                      exact_dedup.apply)


def _minhash() -> GlobalStep:
    cfg = minhash.MinHashConfig()
    return GlobalStep("minhash_dedup", functools.partial(minhash.analyze, cfg=cfg),
                      functools.partial(minhash.combine, cfg=cfg), minhash.apply, cfg)


def _boilerplate() -> GlobalStep:
    cfg = boilerplate.BoilerplateConfig()
    return GlobalStep("boilerplate", functools.partial(boilerplate.analyze, cfg=cfg),
                      functools.partial(boilerplate.combine, cfg=cfg),
                      functools.partial(boilerplate.apply, cfg=cfg), cfg)


def _balance() -> GlobalStep:
    cfg = balance.BalanceConfig()
    return GlobalStep("balance", functools.partial(balance.analyze, cfg=cfg),
                      functools.partial(balance.combine, cfg=cfg),
                      functools.partial(balance.apply, cfg=cfg))


GLOBAL_STEPS: dict[str, Callable[[], GlobalStep]] = {
    "boilerplate": _boilerplate,
    "exact_dedup": _exact,
    "minhash_dedup": _minhash,
    "balance": _balance,
}

DEFAULT_STEPS = ("normalize", "boilerplate", "exact_dedup", "gopher_quality",
                 "gopher_repetition", "c4", "fineweb", "code_quality", "langid", "toxicity",
                 "pii", "decontam", "minhash_dedup")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A global step's `apply` (none for the first segment) followed by map steps, run per unit
    in one pass."""

    global_step: GlobalStep | None
    map_steps: tuple[tuple[str, Callable], ...]


def build(step_names: list[str] | tuple[str, ...]) -> list[Segment]:
    """Resolve step names (with their gin bindings) into segments. Raises for unknown names."""
    names = list(step_names)
    unknown = [n for n in names if n not in MAP_STEPS and n not in GLOBAL_STEPS]
    if unknown:
        raise CurationError(f"Unknown curation steps {unknown}; choose from "
                            f"{sorted(MAP_STEPS) + sorted(GLOBAL_STEPS)} (gin: `curate.steps`).")
    if len(set(names)) != len(names):
        raise CurationError(f"`curate.steps` lists a step twice: {names}.")
    if "balance" in names and names[-1] != "balance":
        raise CurationError("`balance` must be the last curation step (it duplicates documents, "
                            "which any later dedup would undo).")
    segments: list[Segment] = []
    current: GlobalStep | None = None
    maps: list[tuple[str, Callable]] = []
    for n in names:
        if n in GLOBAL_STEPS:
            segments.append(Segment(current, tuple(maps)))
            current, maps = GLOBAL_STEPS[n](), []
        else:
            maps.append((n, MAP_STEPS[n]()))
    segments.append(Segment(current, tuple(maps)))
    return segments


def step_order(segments: list[Segment]) -> list[str]:
    """Names of all steps in the order they run, starting with `read`."""
    out = ["read"]
    for s in segments:
        if s.global_step:
            out.append(s.global_step.name)
        out.extend(n for n, _ in s.map_steps)
    return out
