"""Wanda against magnitude pruning when the inputs carry LLM-like outlier features: a controlled
experiment on a trained run's own weights and calibration inputs.

    python -m tools.wanda_outliers --run_dir=runs/compress/larger --factors=1,5,20,100 \
        [--outlier_channels=2] [--model_factor=50] [--sparsity=0.5] [--calibration_batches=16] \
        [--calibration_batch_size=8] [--eval_batches=12] [--eval_batch_size=8] \
        [--finetune_steps=200] [--finetune_lr=1e-3] [--out=wanda_outliers] [--seed=0]

Our models have no outlier features: the largest input-feature norm ||X_k||_2 of a pruned matrix is
1.3-5x the median (tools/prune_analysis.py), against 20-100x for a handful of features in
LLaMA-class models (Dettmers et al. 2022), which is what Wanda's |W| * ||X_k|| exploits (Sun et
al. 2023). This tool gives the run's own layers such features and measures both criteria:

Part 1, layer output error. For every prunable weight W2 [K, N] with its real calibration Gram
H = X^T X [K, K], `--outlier_channels` input features (seeded; one fixed set per width K, so the
same residual dims in every layer) are scaled so that their norm becomes f x the median norm:
X' = X C, H' = C H C, W unchanged; f = 1 is the run as it is. The mask (`--sparsity`) of each
criterion is scored by its relative output error on the calibration inputs,
||X'(W - W*M)||^2 / ||X'W||^2 = tr(D^T H' D) / tr(W^T H' W), D = W - W*M:
  magnitude (|W|, per layer), magnitude/output, wanda (|W| ||X_k||, per output: the paper's),
  wanda/layer.

Part 2, whole model, same function. The RMSNorm/LayerNorm gain before q/k/v and before the MLP's
wi/wg is multiplied by c_k on the chosen channels and the rows of the weights that read them are
divided by c_k (`awq.fold_scales` with s = 1/c): the model computes the same logits (checked), but
the inputs of q/k/v and wi/wg now have outlier features of `--model_factor` x the median norm, the
way LLMs' norm gains produce them (Wei et al. 2022, "Outlier Suppression"). The run and its
re-parametrised twin are calibrated and pruned by magnitude and by Wanda, and scored on the
validation split (perplexity). Wanda's score |W_kn / c_k| * c_k ||X_k|| is unchanged by the
re-parametrisation; magnitude's is not.

Part 3, whole model trained with outliers. The same norm gains are multiplied by c (a constant
inside the loss, so training cannot undo it) with the weights left as they are, and
`--finetune_steps` AdamW steps let every weight adapt to the outliers, as an LLM's weights are
trained with its own; that model is pruned and scored the same way (`--finetune_steps=0` skips
it; `--model_factor=0` skips parts 2 and 3).

Prints tables; writes <out>.json and <out>.png (relative output error against f).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.compress import validation_metrics
from llm.compress import awq, calibrate, prune
from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.data.sources import DataError
from llm.model import transformer
from llm.runs import load_run

VARIANTS = {"magnitude": ("magnitude", None), "magnitude/output": ("magnitude", "output"),
            "wanda": ("wanda", None), "wanda/layer": ("wanda", "layer")}


def outlier_channels(widths: list[int], count: int, seed: int) -> dict[int, np.ndarray]:
    """{K: `count` distinct channel indices of [0, K)}, one seeded set per width."""
    rng = np.random.default_rng(seed)
    return {k: np.sort(rng.choice(k, size=min(count, k), replace=False))
            for k in sorted(set(widths))}


def outlier_factors(norms: np.ndarray, channels: np.ndarray, factor: float) -> np.ndarray:
    """c [K]: 1 everywhere except on `channels`, where c_k * norms_k = factor * median(norms)."""
    c = np.ones_like(norms)
    if factor != 1:
        c[channels] = factor * np.median(norms) / np.maximum(norms[channels], 1e-12)
    return c


def relative_output_error(w2: np.ndarray, keep: np.ndarray, gram: np.ndarray) -> float:
    """||X (W - W*M)||^2 / ||X W||^2 for H = X^T X."""
    d = w2 * ~keep
    return float(np.sum((gram @ d) * d) / np.sum((gram @ w2) * w2))


def layer_errors(params: dict, axes: dict, grams: dict, factors: list[float], count: int,
                 sparsity: float, seed: int) -> list[dict]:
    """Part 1: per factor, per weight, the relative output error of every variant's mask."""
    flat = {"/".join(Q._path_names(p)): w for p, w in
            jax.tree_util.tree_flatten_with_path(params)[0]}
    weights = prune.prunable(params, axes)
    w2s = {k: np.asarray(Q.to_2d(flat[k], d), np.float64) for k, d in weights.items()}
    chans = outlier_channels([w.shape[0] for w in w2s.values()], count, seed)
    rows = []
    for f in factors:
        for key, w2 in w2s.items():
            norms = np.sqrt(np.maximum(np.diag(grams[key]), 0.0))
            c = outlier_factors(norms, chans[w2.shape[0]], f)
            gram = grams[key] * c[:, None] * c[None, :]
            scaled = norms * c
            row = {"factor": f, "weight": key,
                   "max_over_median": float(scaled.max() / np.median(scaled))}
            for name, (method, scope) in VARIANTS.items():
                keep = prune.mask_2d(w2, method, sparsity, scaled, scope=scope)
                row[name] = relative_output_error(w2, keep, gram)
            rows.append(row)
    return rows


def summarize_layers(rows: list[dict]) -> list[dict]:
    """Per factor: the mean relative output error of each variant over the weights, and on how
    many weights Wanda's error is below magnitude's."""
    out = []
    for f in dict.fromkeys(r["factor"] for r in rows):
        sub = [r for r in rows if r["factor"] == f]
        out.append({"factor": f, "weights": len(sub),
                    "max_over_median": float(np.median([r["max_over_median"] for r in sub])),
                    **{n: float(np.mean([r[n] for r in sub])) for n in VARIANTS},
                    "wanda_below_magnitude": sum(r["wanda"] < r["magnitude"] for r in sub)})
    return out


def norm_groups(params: dict) -> list[dict]:
    """The `awq.scale_groups` whose input comes out of a norm (q/k/v and wi/wg)."""
    return [g for layer in awq.layer_names(params) for g in awq.scale_groups(params, layer)
            if g["prev"][1] == "norm"]


def group_factors(params: dict, grams: dict, factor: float, count: int, seed: int
                  ) -> dict[str, np.ndarray]:
    """{group: c [K]}: the factor that makes `count` seeded channels of the group's input
    `factor` x the median input norm (1 elsewhere)."""
    groups = norm_groups(params)
    chans = outlier_channels([grams[g["inputs"]].shape[0] for g in groups], count, seed)
    out = {}
    for g in groups:
        norms = np.sqrt(np.maximum(np.diag(grams[g["inputs"]]), 0.0))
        out[g["name"]] = outlier_factors(norms, chans[len(norms)], factor)
    return out


def scale_norms(params: dict, factors: dict[str, np.ndarray]) -> dict:
    """params with each group's norm gain (and bias) multiplied by its c [K]; the weights that
    read the norm are unchanged, so the model's function changes (jit-safe)."""
    out = awq._copy(params)
    for g in norm_groups(params):
        if g["name"] in factors:
            c = jnp.asarray(factors[g["name"]], jnp.float32)
            prev = g["prev"][0]
            for leaf in ("scale", "bias"):
                if leaf in awq._get(out, prev):
                    v = awq._get(out, f"{prev}/{leaf}")
                    awq._set(out, f"{prev}/{leaf}", v * c.astype(v.dtype))
    return out


def model_experiment(run, axes: dict, batches: list[dict], grams: dict, *, factor: float,
                     count: int, sparsity: float, seed: int, eval_kw: dict,
                     finetune_steps: int, finetune_lr: float, finetune_batch_size: int) -> dict:
    """Part 2: magnitude and Wanda at `sparsity` on (a) the run, (b) its function-preserving
    twin with outlier features folded into the norm gains, (c) the run with the norm gains
    multiplied by the same factors and the weights left as they are -- the outliers are a
    fixed part of the model (`scale_norms` inside the loss), and `finetune_steps` AdamW steps
    let every weight adapt to them, as an LLM's weights are trained with its outliers."""
    from llm.compress import finetune

    data_dir = run.manifest.get("data", {}).get("data_dir", "")
    c = group_factors(run.params, grams, factor, count, seed)
    folded = awq.fold_scales(run.params, axes, {k: 1.0 / v for k, v in c.items()})
    ids = jnp.asarray(batches[0]["inputs"][:2])
    a = np.asarray(transformer.apply(run.graphdef, run.params, ids))
    b = np.asarray(transformer.apply(run.graphdef, folded, ids))
    out = {"factor": factor, "outlier_channels": count, "sparsity": sparsity,
           "relative_logit_difference_folded": float(np.max(np.abs(a - b)) / np.max(np.abs(a))),
           "finetune": {"steps": finetune_steps, "lr": finetune_lr,
                        "batch_size": finetune_batch_size, "seq_len": run.seq_len},
           "input_spread": {}, "rows": []}
    models = [("original", run.params, grams), ("same function, outliers folded", folded, None)]
    if finetune_steps > 0:
        trained, losses = finetune.finetune(
            run.graphdef, run.params, lambda p: scale_norms(p, c), data_dir=data_dir,
            steps=finetune_steps, seq_len=run.seq_len, batch_size=finetune_batch_size,
            learning_rate=finetune_lr, seed=seed)
        out["finetune"]["first_last_loss"] = [losses[0], float(np.mean(losses[-10:]))]
        models.append((f"outliers fixed, fine-tuned {finetune_steps} steps", trained, None))
    for label, params, g in models:
        if g is None:
            g, _ = calibrate.gram_matrices(run.graphdef, params, batches)
        spread = [float(np.sqrt(np.diag(g[k])).max() / np.median(np.sqrt(np.diag(g[k]))))
                  for k in g if k.endswith(("attn/q/kernel", "mlp/wi/kernel"))]
        out["input_spread"][label] = [min(spread), max(spread)]
        base = validation_metrics(run, params, data_dir, **eval_kw)
        out["rows"].append({"model": label, "variant": "unpruned",
                            "perplexity": base["perplexity"], "perplexity_pct": 0.0})
        print(f"  {label:40s} unpruned   ppl {base['perplexity']:.3f}", flush=True)
        for name in ("magnitude", "wanda"):
            masks = prune.compute_masks(params, axes, name, sparsity, g)
            m = validation_metrics(run, prune.apply_masks(params, masks), data_dir, **eval_kw)
            out["rows"].append({"model": label, "variant": name, "perplexity": m["perplexity"],
                                "perplexity_pct": 100 * (m["perplexity"] / base["perplexity"]
                                                         - 1)})
            print(f"  {label:40s} {name:10s} ppl {m['perplexity']:.3f} "
                  f"({out['rows'][-1]['perplexity_pct']:+.2f}%)", flush=True)
    return out


def analyse(run_dir: str, factors: list[float], *, count: int, model_factor: float,
            sparsity: float, calibration_batches: int, calibration_batch_size: int,
            eval_batches: int, eval_batch_size: int, seed: int, finetune_steps: int = 200,
            finetune_lr: float = 1e-3, finetune_batch_size: int = 8) -> dict:
    prune.check_sparsity(sparsity)
    if count < 1:
        raise ConfigError(f"--outlier_channels={count}: give at least 1 channel.")
    if any(f < 1 for f in factors) or 0 < model_factor < 1 or model_factor < 0:
        raise ConfigError(f"--factors={factors} / --model_factor={model_factor}: outlier factors "
                          "are multiples of the median norm, >= 1 (model_factor 0: skip).")
    run = load_run(run_dir)
    data_dir = run.manifest.get("data", {}).get("data_dir", "")
    _, _, axes = transformer.abstract(run.cfg)
    batches = calibrate.calibration_batches(data_dir, num_batches=calibration_batches,
                                            batch_size=calibration_batch_size,
                                            seq_len=run.seq_len, seed=seed)
    grams, tokens = calibrate.gram_matrices(run.graphdef, run.params, batches)
    rows = layer_errors(run.params, axes, grams, factors, count, sparsity, seed)
    result = {"run_dir": run.run_dir, "step": run.step, "params": run.cfg.num_params(),
              "calibration_tokens": tokens, "sparsity": sparsity, "outlier_channels": count,
              "seed": seed, "layer_summary": summarize_layers(rows), "layer_rows": rows}
    print_layer_table(result)
    if model_factor > 0:
        result["model"] = model_experiment(
            run, axes, batches, grams, factor=model_factor, count=count, sparsity=sparsity,
            seed=seed, eval_kw=dict(batch_size=eval_batch_size, max_batches=eval_batches),
            finetune_steps=finetune_steps, finetune_lr=finetune_lr,
            finetune_batch_size=finetune_batch_size)
        result["model"]["eval"] = {"batches": eval_batches, "batch_size": eval_batch_size}
    return result


def print_layer_table(r: dict) -> None:
    print(f"\n{r['run_dir']} step {r['step']} ({r['params'] / 1e6:.2f}M params); "
          f"{r['calibration_tokens']} calibration tokens; {r['outlier_channels']} outlier "
          f"channels per input width; sparsity {r['sparsity']:.0%}")
    print("| outlier norm / median | max/median (median weight) | "
          + " | ".join(VARIANTS) + " | Wanda < magnitude |")
    print("|---|---|" + "---|" * len(VARIANTS) + "---|")
    for s in r["layer_summary"]:
        label = "as trained" if s["factor"] == 1 else f"{s['factor']:g}x"
        print(f"| {label} | {s['max_over_median']:.1f} | "
              + " | ".join(f"{s[n]:.4f}" for n in VARIANTS)
              + f" | {s['wanda_below_magnitude']}/{s['weights']} |")


def print_model_table(m: dict) -> None:
    print(f"\nwhole model, outliers {m['factor']:g}x the median on {m['outlier_channels']} "
          f"channels of the q/k/v and wi/wg inputs; folding changed the logits by "
          f"{m['relative_logit_difference_folded']:.1e} of their max")
    print("| model | max/median input norm (q, wi) | unpruned ppl | magnitude | wanda |\n"
          "|---|---|---|---|---|")
    for label, (lo, hi) in m["input_spread"].items():
        r = {x["variant"]: x for x in m["rows"] if x["model"] == label}
        print(f"| {label} | {lo:.1f}-{hi:.1f} | {r['unpruned']['perplexity']:.3f} | "
              f"{r['magnitude']['perplexity_pct']:+.2f}% | {r['wanda']['perplexity_pct']:+.2f}% |")


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["layer_summary"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in VARIANTS:
        ax.plot([x["factor"] for x in s], [x[name] for x in s], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("outlier feature norm / median norm (1 = the run as trained)")
    ax.set_ylabel("relative output error of the mask (mean over weights)")
    ax.set_title(f"{r['sparsity']:.0%} pruning, {r['params'] / 1e6:.2f}M run's layers")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.wanda_outliers",
                                description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--factors", default="1,5,20,100")
    p.add_argument("--outlier_channels", type=int, default=2)
    p.add_argument("--model_factor", type=float, default=50.0,
                   help="outlier norm / median for the whole-model experiment (0: skip it)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calibration_batches", type=int, default=16)
    p.add_argument("--calibration_batch_size", type=int, default=8)
    p.add_argument("--eval_batches", type=int, default=12)
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--finetune_steps", type=int, default=200,
                   help="AdamW steps of the model trained with fixed outliers (0: skip it)")
    p.add_argument("--finetune_lr", type=float, default=1e-3)
    p.add_argument("--finetune_batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="writes <out>.json and <out>.png")
    a = p.parse_args(argv)
    try:
        try:
            factors = [float(f) for f in a.factors.split(",")]
        except ValueError:
            raise ConfigError(f"--factors={a.factors!r} must be comma-separated numbers >= 1, "
                              "e.g. 1,5,20,100.") from None
        r = analyse(a.run_dir, factors, count=a.outlier_channels, model_factor=a.model_factor,
                    sparsity=a.sparsity, calibration_batches=a.calibration_batches,
                    calibration_batch_size=a.calibration_batch_size,
                    eval_batches=a.eval_batches, eval_batch_size=a.eval_batch_size, seed=a.seed,
                    finetune_steps=a.finetune_steps, finetune_lr=a.finetune_lr,
                    finetune_batch_size=a.finetune_batch_size)
    except (ConfigError, DataError) as e:
        print(f"wanda_outliers: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if "model" in r:
        print_model_table(r["model"])
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(r, f, indent=2)
        plot(r, a.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
