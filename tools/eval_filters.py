"""Precision/recall of the PII and toxicity filters on the frozen labelled sets.

    python -m tools.eval_filters                       # tables on stdout
    python -m tools.eval_filters --out runs/eval_filters.json --errors

The sets, their provenance and their hashes: tests/curate/eval_sets/README.md. Scoring rules:
llm/data/curate/filter_eval.py. Toxicity is judged per sentence: the word-list scorer flags a
sentence with at least `--min_hits` listed tokens (documents use `toxicity.min_hits`, default 2,
and a rate threshold; a sentence is the unit of the labelled set). `--scorer module:function`
grades another scorer `(text) -> float`, flagged at `--threshold`.
"""

from __future__ import annotations

import argparse
import json
import os

from llm.data.curate import filter_eval, pii, toxicity


def toxicity_predictor(scorer: str, min_hits: int, threshold: float):
    """`text -> bool` for the word list (`scorer='wordlist'`) or a `module:function` scorer."""
    if scorer == "wordlist":
        return lambda text: toxicity.wordlist_score(text)[1] >= min_hits
    fn = toxicity._load(scorer)
    return lambda text: float(fn(text)) >= threshold


def run(scorer: str = "wordlist", min_hits: int = 1, threshold: float = 0.5,
        ip_scope: str = "public") -> dict:
    """Both evaluations; the result is JSON-serializable."""
    pii_res = filter_eval.score_pii(lambda t: pii.find(t, ip_scope=ip_scope),
                                    filter_eval.load_pii())
    tox_res = filter_eval.score_toxicity(toxicity_predictor(scorer, min_hits, threshold),
                                         filter_eval.load_toxicity())
    return {"pii": pii_res, "toxicity": tox_res,
            "toxicity_scorer": {"scorer": scorer, "min_hits": min_hits, "threshold": threshold},
            "pii_ip_scope": ip_scope}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", default="wordlist")
    ap.add_argument("--min_hits", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--ip_scope", default="public", choices=pii.IP_SCOPES)
    ap.add_argument("--errors", action="store_true", help="list every miss and false positive")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    res = run(a.scorer, a.min_hits, a.threshold, a.ip_scope)
    print(f"PII (frozen set tests/curate/eval_sets/pii.jsonl, ip_scope={a.ip_scope})")
    print(filter_eval.pii_table(res["pii"]))
    t = res["toxicity"]
    print(f"\nToxicity ({a.scorer}): TP {t['tp']} FP {t['fp']} FN {t['fn']} TN {t['tn']}  "
          f"precision {t['precision']:.3f} recall {t['recall']:.3f}")
    print("flagged per category:", t["flagged_per_category"])
    if a.errors:
        for typ, r in res["pii"].items():
            for v in r["missed"]:
                print(f"  PII missed {typ}: {v!r}")
            for v in r["false"]:
                print(f"  PII false {typ}: {v!r}")
        for kind, cat, text in t["errors"]:
            print(f"  toxicity {kind} [{cat}]: {text}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
