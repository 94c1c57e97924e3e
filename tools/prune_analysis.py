"""Why Wanda does (or does not) beat magnitude pruning on a run: a sparsity sweep with the
paper's ablations, and the input-feature norm spread that Wanda's score relies on.

    python -m tools.prune_analysis --run_dir=runs/quickstart --sparsity=0.5,0.6,0.7 \
        [--calibration_batches=16] [--calibration_batch_size=8] [--eval_batches=24] \
        [--eval_batch_size=8] [--out=prune_analysis.json]

Variants (Sun et al. 2023, Table 7's ablation axes), all without fine-tuning:
  magnitude          |W|, the lowest of the whole matrix (per layer)
  magnitude/output   |W|, compared within each output channel
  wanda/layer        |W| * ||X_k||_2, compared over the whole matrix
  wanda              |W| * ||X_k||_2, compared within each output channel (the paper's)
  wanda/sequential   as wanda, block i calibrated on the model with blocks < i already pruned

Norm spread, per prunable weight: the input-feature norms n_k = ||X[:, k]||_2 over the
calibration tokens; max/median and p99/median of n_k (LLMs with emergent outlier features have
a few features 20-100x the median, Dettmers et al. 2022), and the fraction of kept weights on
which Wanda's mask and magnitude/output's mask disagree at 50%. Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np
from tqdm import tqdm

from experiments.compress import validation_metrics
from llm.compress import calibrate, prune
from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.data.sources import DataError
from llm.model import transformer
from llm.runs import load_run

VARIANTS = {"magnitude": ("magnitude", None, False),
            "magnitude/output": ("magnitude", "output", False),
            "wanda/layer": ("wanda", "layer", False),
            "wanda": ("wanda", "output", False),
            "wanda/sequential": ("wanda", "output", True)}


def norm_spread(params: dict, axes: dict, grams: dict) -> dict[str, dict]:
    """{weight path: {max_over_median, p99_over_median, mask_disagreement_50}}."""
    flat = {"/".join(Q._path_names(p)): w for p, w in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for key, dims in prune.prunable(params, axes).items():
        n = np.sqrt(np.maximum(np.diag(grams[key]), 0.0))
        med = np.median(n)
        w2 = np.asarray(Q.to_2d(flat[key], dims), np.float64)
        a = prune.mask_2d(w2, "wanda", 0.5, n)
        b = prune.mask_2d(w2, "magnitude", 0.5, scope="output")
        out[key] = {"max_over_median": float(n.max() / med),
                    "p99_over_median": float(np.percentile(n, 99) / med),
                    "mask_disagreement_50": float(np.mean(a != b))}
    return out


def analyse(run_dir: str, sparsities: list[float], *, calibration_batches: int,
            calibration_batch_size: int, eval_batches: int, eval_batch_size: int,
            variants: list[str]) -> dict:
    run = load_run(run_dir)
    data_dir = run.manifest.get("data", {}).get("data_dir", "")
    _, _, axes = transformer.abstract(run.cfg)
    batches = calibrate.calibration_batches(data_dir, num_batches=calibration_batches,
                                            batch_size=calibration_batch_size,
                                            seq_len=run.seq_len)
    grams, tokens = calibrate.gram_matrices(run.graphdef, run.params, batches)
    kw = dict(batch_size=eval_batch_size, max_batches=eval_batches)
    base = validation_metrics(run, run.params, data_dir, **kw)
    rows = []
    for sparsity in sparsities:
        prune.check_sparsity(sparsity)
        for name in tqdm(variants, desc=f"sparsity {sparsity}", leave=False):
            method, scope, sequential = VARIANTS[name]
            if sequential:
                masks = prune.sequential_masks(run.graphdef, run.params, axes, method, sparsity,
                                               batches, scope=scope)
            else:
                masks = prune.compute_masks(run.params, axes, method, sparsity, grams,
                                            scope=scope)
            m = validation_metrics(run, prune.apply_masks(run.params, masks), data_dir, **kw)
            rows.append({"sparsity": sparsity, "variant": name,
                         "perplexity": m["perplexity"], "bits_per_byte": m["bits_per_byte"],
                         "perplexity_pct": 100 * (m["perplexity"] / base["perplexity"] - 1)})
            print(f"  {sparsity:.2f} {name:18s} ppl {m['perplexity']:.3f} "
                  f"({rows[-1]['perplexity_pct']:+.2f}%)", flush=True)
    return {"run_dir": run.run_dir, "step": run.step, "params": run.cfg.num_params(),
            "calibration_tokens": tokens, "eval": kw, "original": base, "rows": rows,
            "norm_spread": norm_spread(run.params, axes, grams)}


def print_tables(r: dict) -> None:
    print(f"\n{r['run_dir']} step {r['step']} ({r['params'] / 1e6:.2f}M params), original "
          f"perplexity {r['original']['perplexity']:.3f}; calibration {r['calibration_tokens']} "
          "tokens")
    sparsities = sorted({x["sparsity"] for x in r["rows"]})
    names = list(dict.fromkeys(x["variant"] for x in r["rows"]))
    print("| variant | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|" + "---|" * len(sparsities))
    for n in names:
        cells = [next(f"{x['perplexity_pct']:+.1f}%" for x in r["rows"]
                      if x["variant"] == n and x["sparsity"] == s) for s in sparsities]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n| weight | max/median ‖X_k‖ | p99/median | Wanda vs magnitude/output mask "
          "differ (50%) |\n|---|---|---|---|")
    for k, v in r["norm_spread"].items():
        print(f"| {k} | {v['max_over_median']:.1f} | {v['p99_over_median']:.1f} | "
              f"{v['mask_disagreement_50']:.1%} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.prune_analysis",
                                description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--sparsity", default="0.5,0.6,0.7")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--calibration_batches", type=int, default=16)
    p.add_argument("--calibration_batch_size", type=int, default=8)
    p.add_argument("--eval_batches", type=int, default=24)
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        variants = a.variants.split(",")
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            raise ConfigError(f"--variants={bad[0]!r} is not one of {', '.join(VARIANTS)}.")
        try:
            sparsities = [float(s) for s in a.sparsity.split(",")]
        except ValueError:
            raise ConfigError(f"--sparsity={a.sparsity!r} must be comma-separated fractions "
                              "in [0, 1), e.g. 0.5,0.6,0.7.") from None
        r = analyse(a.run_dir, sparsities, calibration_batches=a.calibration_batches,
                    calibration_batch_size=a.calibration_batch_size,
                    eval_batches=a.eval_batches, eval_batch_size=a.eval_batch_size,
                    variants=variants)
    except (ConfigError, DataError) as e:
        print(f"prune_analysis: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print_tables(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
