"""Precision and recall of the PII and toxicity filters on the frozen labelled sets.

The sets live in `tests/curate/eval_sets/` (provenance, label definitions and hashes in its
README). They were written before the rules were read and are never edited to fit a rule.

PII scoring, per type: a labelled value is found (TP) when predicted spans of its type cover at
least `min_cover` of its characters, else it is missed (FN); a predicted span that overlaps no
labelled value of its type is a false positive (FP), whatever it overlaps. `leaked` counts the
labelled values that no prediction of any type covers (what a reader of the output still sees).

Toxicity scoring: one verdict per sentence, against the `label` column, overall and per category.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable

EVAL_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "curate",
                        "eval_sets")
FROZEN = {  # file -> sha256 at freeze time (see the README next to the sets)
    "toxicity.tsv": "00973f2aadbf1e20ed286bcb147f4addc2fdeabec2315517dfe3d07ca748fbe4",
    "pii.jsonl": "4bdb4fd2c8c687dddf1be8bdf34aef6a7ce54edb7eb828d5b2c6dee98789492f",
}
# Label types of the set -> the detector's types that count for them.
PII_TYPES = {"email": ("EMAIL",), "phone": ("PHONE",), "ip_address": ("IP_ADDRESS",),
             "credit_card": ("CREDIT_CARD",), "iban": ("IBAN",), "us_ssn": ("SSN",),
             "secret": ("API_KEY", "PRIVATE_KEY")}


def _path(name: str, eval_dir: str | None) -> str:
    path = os.path.join(eval_dir or EVAL_DIR, name)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != FROZEN[name]:
        raise ValueError(f"{path} changed since it was frozen (sha256 {digest}); frozen sets are "
                         "never edited: restore it, or add a new set with its own hash.")
    return path


def load_pii(eval_dir: str | None = None) -> list[dict]:
    """Rows `{"kind", "text", "pii": [[type, value], ...]}` of the frozen PII set."""
    with open(_path("pii.jsonl", eval_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_toxicity(eval_dir: str | None = None) -> list[dict]:
    """Rows `{"label": 0|1, "category", "text"}` of the frozen toxicity set."""
    with open(_path("toxicity.tsv", eval_dir), encoding="utf-8", newline="") as f:
        return [{**r, "label": int(r["label"])}
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _labels(row: dict) -> list[tuple[int, int, str]]:
    out, used = [], []
    for typ, value in row["pii"]:
        start = row["text"].find(value)
        while any(a <= start < b for a, b, _ in out):   # the same value twice in one row
            start = row["text"].find(value, start + 1)
        out.append((start, start + len(value), typ))
        used.append(start)
    return out


def _covered(a: int, b: int, spans: list[tuple[int, int]]) -> int:
    return sum(max(0, min(b, e) - max(a, s)) for s, e in spans)


def score_pii(find: Callable[[str], list[tuple[int, int, str]]], rows: list[dict],
              min_cover: float = 0.8) -> dict:
    """Confusion counts and P/R per label type for a detector `find(text) -> [(start, end,
    DETECTOR_TYPE)]`; detector types are mapped with `PII_TYPES`, unknown ones are ignored."""
    to_label = {d: lab for lab, ds in PII_TYPES.items() for d in ds}
    res = {t: {"tp": 0, "fn": 0, "fp": 0, "leaked": 0, "missed": [], "false": []}
           for t in PII_TYPES}
    for row in rows:
        labels = _labels(row)
        preds = [(a, b, to_label[t]) for a, b, t in find(row["text"]) if t in to_label]
        for a, b, typ in labels:
            same = [(s, e) for s, e, t in preds if t == typ]
            anyt = [(s, e) for s, e, _ in preds]
            if _covered(a, b, same) >= min_cover * (b - a):
                res[typ]["tp"] += 1
            else:
                res[typ]["fn"] += 1
                res[typ]["missed"].append(row["text"][a:b])
            if _covered(a, b, anyt) < min_cover * (b - a):
                res[typ]["leaked"] += 1
        for s, e, t in preds:
            if not any(t == typ and min(b, e) > max(a, s) for a, b, typ in labels):
                res[t]["fp"] += 1
                res[t]["false"].append(row["text"][s:e])
    for r in res.values():
        found, pred = r["tp"] + r["fn"], r["tp"] + r["fp"]
        r["recall"] = r["tp"] / found if found else None
        r["precision"] = r["tp"] / pred if pred else None
    return res


def score_toxicity(predict: Callable[[str], bool], rows: list[dict]) -> dict:
    """Confusion counts, P/R overall and the flagged rate per category for `predict(text)`."""
    tp = fp = fn = tn = 0
    per_cat: dict[str, list[int]] = {}
    errors = []
    for r in rows:
        y = bool(predict(r["text"]))
        c = per_cat.setdefault(r["category"], [0, 0])
        c[0] += y
        c[1] += 1
        if y and r["label"]:
            tp += 1
        elif y:
            fp += 1
            errors.append(("fp", r["category"], r["text"]))
        elif r["label"]:
            fn += 1
            errors.append(("fn", r["category"], r["text"]))
        else:
            tn += 1
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "flagged_per_category": {k: f"{a}/{n}" for k, (a, n) in sorted(per_cat.items())},
            "errors": errors}


def pii_table(res: dict) -> str:
    """A markdown table of `score_pii`'s result."""
    lines = ["| type | TP | FN | FP | leaked | precision | recall |",
             "|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for t, r in res.items():
        lines.append(f"| {t} | {r['tp']} | {r['fn']} | {r['fp']} | {r['leaked']} | "
                     f"{f(r['precision'])} | {f(r['recall'])} |")
    tp = sum(r["tp"] for r in res.values())
    fn = sum(r["fn"] for r in res.values())
    fp = sum(r["fp"] for r in res.values())
    lines.append(f"| all | {tp} | {fn} | {fp} | {sum(r['leaked'] for r in res.values())} | "
                 f"{f(tp / (tp + fp) if tp + fp else None)} | {f(tp / (tp + fn))} |")
    return "\n".join(lines)
