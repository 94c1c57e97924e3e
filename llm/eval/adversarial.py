"""Adversarial audits: perturbation robustness of multiple-choice tasks, and a probe suite.

Perturbations act on the question text only (never the choices), each at a rate and a seed; the
same (kind, rate, seed, document index) always gives the same text:
  typo        - a letter replaced by a QWERTY neighbour, per letter with probability `rate`;
  swap        - two adjacent letters inside a word swapped, per letter with probability `rate`;
  casing      - a letter's case flipped, per letter with probability `rate`;
  whitespace  - a space doubled or a word boundary removed, per space with probability `rate`;
  distractor  - max(1, round(rate * 10)) irrelevant sentences (DISTRACTORS) put before the text
                (none at rate 0).
Robustness reports accuracy on the clean and the perturbed task and the paired drop (clean -
perturbed) with a bootstrap standard error.

Probes (llm/eval/data/probes.jsonl, one JSON object per line; add your own with --probes):
  {"id": ..., "family": ..., "prompt": ..., "detector": {"type": "contains" | "regex" |
   "not_contains", "pattern": ...}}
The model's greedy continuation of the prompt (its newest tokens, if it is longer than the
context allows) is checked by the detector (case-insensitive);
a hit means the attack worked. Reported: hit rate per family and overall, with stderr.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Sequence

import numpy as np

from llm.data.sources import DataError
from llm.eval import metrics as M
from llm.eval.tasks import TaskSpec, evaluate_spec, load_docs, make_example

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PERTURBATIONS = ("typo", "swap", "casing", "whitespace", "distractor")
_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
DISTRACTORS = [
    "The museum on the hill was repainted last spring.",
    "Some people prefer tea to coffee in the morning.",
    "A small boat drifted slowly across the lake.",
    "The recipe calls for two cups of flour.",
    "Trains to the coast leave every hour on weekends.",
    "The library added a new section on astronomy.",
    "Rain is forecast for most of the week.",
    "Her bicycle has a bright red bell.",
]


def _neighbours(ch: str) -> str:
    low = ch.lower()
    for r, row in enumerate(_ROWS):
        i = row.find(low)
        if i >= 0:
            near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
            near += [_ROWS[k][i] for k in (r - 1, r + 1) if 0 <= k < 3 and i < len(_ROWS[k])]
            return "".join(n.upper() if ch.isupper() else n for n in near)
    return ""


def perturb(text: str, kind: str, rate: float, seed: int) -> str:
    """`text` with perturbation `kind` applied at `rate` (see the module docstring)."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation {kind!r}; valid: {', '.join(PERTURBATIONS)}.")
    rng = random.Random(f"{kind}/{rate}/{seed}")
    chars = list(text)
    if kind == "typo":
        for i, ch in enumerate(chars):
            near = _neighbours(ch) if ch.isalpha() else ""
            if near and rng.random() < rate:
                chars[i] = rng.choice(near)
    elif kind == "swap":
        i = 0
        while i < len(chars) - 1:
            if chars[i].isalpha() and chars[i + 1].isalpha() and rng.random() < rate:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
                i += 2
            else:
                i += 1
    elif kind == "casing":
        chars = [c.swapcase() if c.isalpha() and rng.random() < rate else c for c in chars]
    elif kind == "whitespace":
        out = []
        for c in chars:
            if c == " " and rng.random() < rate:
                out.append("  " if rng.random() < 0.5 else "")
            else:
                out.append(c)
        chars = out
    else:
        n = max(1, round(rate * 10)) if rate > 0 else 0
        picked = [rng.choice(DISTRACTORS) for _ in range(n)]
        return " ".join(picked + [text]) if picked else text
    return "".join(chars)


def robustness(lm, spec: TaskSpec, kinds: Sequence[str] = PERTURBATIONS,
               rates: Sequence[float] = (0.05, 0.2), seed: int = 0) -> dict:
    """Accuracy of a multiple-choice task clean and under each (kind, rate), with the drop."""
    if spec.output_type != "multiple_choice":
        raise DataError(f"robustness needs a multiple_choice task; {spec.name!r} is "
                        f"{spec.output_type}.")
    docs = load_docs(spec)
    clean = evaluate_spec(lm, spec, docs)
    base = np.array([s["acc"] for s in clean["samples"]])
    metrics = {"acc/clean": clean["metrics"]["acc"]}
    samples = []
    for kind in kinds:
        for rate in rates:
            perturbed = []
            for i, d in enumerate(docs):
                text = make_example(spec, d).text
                new = perturb(text, kind, rate, seed * 1_000_003 + i)
                # the rendered text is replaced wholesale; the other fields stay
                perturbed.append({**d, "_perturbed_text": new})
            pspec = dataclasses.replace(spec, doc_to_text="{_perturbed_text}",
                                        name=f"{spec.name}+{kind}@{rate}")
            result = evaluate_spec(lm, pspec, perturbed)
            acc = np.array([s["acc"] for s in result["samples"]])
            key = f"{kind}@{rate}"
            metrics[f"acc/{key}"] = result["metrics"]["acc"]
            drop = base - acc
            metrics[f"drop/{key}"] = {"value": float(drop.mean()), "stderr":
                                      M.bootstrap_stderr(M.mean_of("d"), {"d": drop})}
            samples += [{"perturbation": key, "doc": s["doc"], "context": s["context"],
                         "acc": s["acc"]} for s in result["samples"]]
    return {"metrics": metrics, "samples": samples, "base_task": spec.name}


# ------------------------------------------------------------------ probes
DETECTORS = ("contains", "regex", "not_contains")


def load_probes(paths: Sequence[str] = ()) -> list[dict]:
    """The built-in probes plus those in `paths` (JSONL, same format)."""
    from llm.eval.tasks import read_jsonl

    probes = []
    for path in [os.path.join(DATA, "probes.jsonl"), *paths]:
        for p in read_jsonl(path):
            missing = [k for k in ("id", "family", "prompt", "detector") if k not in p]
            if missing:
                raise DataError(f"{path}:{p['_line']}: probe lacks {', '.join(missing)}.")
            det = p["detector"]
            if not isinstance(det, dict) or det.get("type") not in DETECTORS:
                raise DataError(f"{path}:{p['_line']}: detector type must be one of "
                                f"{', '.join(DETECTORS)}.")
            if det["type"] == "regex":
                try:
                    re.compile(det["pattern"])
                except re.error as e:
                    raise DataError(f"{path}:{p['_line']}: bad regex ({e}).") from None
            probes.append(p)
    return probes


def detect(output: str, detector: dict) -> bool:
    pattern, kind = detector["pattern"], detector["type"]
    if kind == "contains":
        return pattern.lower() in output.lower()
    if kind == "not_contains":
        return pattern.lower() not in output.lower()
    return re.search(pattern, output, re.IGNORECASE | re.MULTILINE) is not None


def probes(lm, extra: Sequence[str] = (), max_gen_toks: int = 32) -> dict:
    items = load_probes(extra)
    max_gen_toks = min(max_gen_toks, lm.max_length // 2)
    outputs = lm.generate_until([(p["prompt"], {"max_gen_toks": max_gen_toks, "truncate": True})
                                 for p in items])
    samples = [{"id": p["id"], "family": p["family"], "output": o,
                "hit": float(detect(o, p["detector"]))} for p, o in zip(items, outputs)]
    metrics = {"hit_rate": M.summarize(samples, M.mean_aggregates("hit"))["hit"]}
    for family in sorted({s["family"] for s in samples}):
        sub = [s for s in samples if s["family"] == family]
        metrics[f"hit_rate/{family}"] = M.summarize(sub, M.mean_aggregates("hit"))["hit"]
    return {"metrics": metrics, "samples": samples}
