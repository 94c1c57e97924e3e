"""Summarise RL runs over seeds: held-out reward gain over the reference (the SFT policy), KL to
the reference, and one PNG of the reward and KL curves of every run.

  .venv/bin/python -m tools.rlhf_report runs/grpo_code_s{0,1,2} runs/ppo_code_s{0,1,2} \
      --png docs/rlhf_curves.png --json rlhf_report.json

Each run directory is an `experiments.rlhf` run (eval.json: reward_policy, reward_reference,
kl_policy; metrics.jsonl: reward and kl per step). Runs are grouped by their algorithm. With
--target_kl, a second table says how closely each run's training KL followed the target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm.train.metrics import read_metrics  # noqa: E402


def summarise(run_dirs: list[str]) -> dict:
    """{algorithm: {runs, seeds, reward_reference, reward_policy, gain (mean, sd, min),
    kl_policy (mean, max), max training kl}}."""
    groups: dict[str, list[dict]] = {}
    for d in run_dirs:
        with open(os.path.join(d, "eval.json")) as f:
            ev = json.load(f)
        with open(os.path.join(d, "manifest.json")) as f:
            seed = json.load(f)["seed"]
        records = read_metrics(os.path.join(d, "metrics.jsonl"))
        groups.setdefault(ev["algorithm"], []).append(
            {"run_dir": d, "seed": seed, **{k: ev[k] for k in (
                "reward_policy", "reward_reference", "reward_gain", "kl_policy", "kl_k3_policy",
                "step", "eval_prompts")},
             "train_kl_max": max(r["kl"] for r in records),
             "train_reward_first5": statistics.mean(r["reward"] for r in records[:5]),
             "train_reward_last5": statistics.mean(r["reward"] for r in records[-5:]),
             "train_kl_last10": statistics.mean(r["kl"] for r in records[-10:]),
             **{k: v for k, v in ev.items() if k.startswith("reward_") and k.count("_") > 1
                and k not in ("reward_gain",)}})
    out = {}
    for algo, runs in groups.items():
        gains = [r["reward_gain"] for r in runs]
        out[algo] = {"runs": runs, "seeds": [r["seed"] for r in runs],
                     "gain_mean": statistics.mean(gains),
                     "gain_sd": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                     "gain_min": min(gains),
                     "reward_reference_mean": statistics.mean(r["reward_reference"] for r in runs),
                     "reward_policy_mean": statistics.mean(r["reward_policy"] for r in runs),
                     "kl_policy_mean": statistics.mean(r["kl_policy"] for r in runs),
                     "train_kl_max": max(r["train_kl_max"] for r in runs),
                     "train_kl_last10_mean": statistics.mean(r["train_kl_last10"] for r in runs)}
        for key in sorted({k for r in runs for k in r if k.endswith("_gain")} - {"reward_gain"}):
            values = [r[key] for r in runs if key in r]
            out[algo][key + "_mean"] = statistics.mean(values)
            out[algo][key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def kl_tracking(kls: list[float], target: float, after: int = 20) -> dict:
    """How closely a run's training KL (one value per step, nats/seq) followed `target`: the
    peak, and over the steps after the first `after` (the approach to the target), the mean
    |KL - target|, the share of steps within [target / 2, 2 target], and the steps above
    2 target."""
    late = kls[after:]
    return {"kl_max": max(kls), "kl_max_step": kls.index(max(kls)) + 1,
            "kl_abs_err": statistics.mean(abs(k - target) for k in late),
            "kl_in_band": sum(target / 2 <= k <= 2 * target for k in late) / len(late),
            "kl_steps_above_2x": sum(k > 2 * target for k in late)}


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (the first ones over fewer)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


PANELS = (("reward", "training reward (mean over the step's samples)"),
          ("kl", "KL(policy || SFT reference), nats/seq (k1)"),
          ("kl_coef", "KL coefficient"),
          ("entropy", "policy entropy, nats/token"),
          ("response_length", "response length, tokens"))


def plot(run_dirs: list[str], path: str, smooth: int = 1, target_kl: float | None = None
         ) -> None:
    """One panel per PANELS metric, one line per run (trailing mean over `smooth` steps); the
    KL panel also draws `target_kl` as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), dpi=100)
    for d in run_dirs:
        records = read_metrics(os.path.join(d, "metrics.jsonl"))
        label = os.path.basename(os.path.normpath(d))
        steps = [r["step"] for r in records]
        for ax, (key, _) in zip(axes, PANELS):
            if all(key in r for r in records):
                ax.plot(steps, _smooth([r[key] for r in records], smooth), lw=1, label=label)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title + (f", mean of {smooth} steps" if smooth > 1 else ""), fontsize=8)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    if target_kl is not None:
        axes[1].axhline(target_kl, color="k", ls="--", lw=1, label=f"target {target_kl:g}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--png", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--smooth", type=int, default=1, help="trailing mean over N steps (plots)")
    p.add_argument("--target_kl", type=float, default=None, help="dashed line on the KL plot")
    args = p.parse_args(argv)
    summary = summarise(args.runs)
    print("| algorithm | seeds | reference reward | policy reward | gain (mean +- sd, min) | "
          "held-out KL (nats/seq) | max training KL |\n|---|---|---|---|---|---|---|")
    for algo, s in summary.items():
        print(f"| {algo} | {', '.join(map(str, s['seeds']))} | {s['reward_reference_mean']:.3f} "
              f"| {s['reward_policy_mean']:.3f} | {s['gain_mean']:+.3f} +- {s['gain_sd']:.3f}, "
              f"min {s['gain_min']:+.3f} | {s['kl_policy_mean']:.2f} | {s['train_kl_max']:.2f} |")
    if args.target_kl is not None:
        print(f"\n| run | peak KL (step) | mean abs(KL - {args.target_kl:g}), steps 21+ | steps in "
              f"[{args.target_kl / 2:g}, {2 * args.target_kl:g}] | steps above "
              f"{2 * args.target_kl:g} |\n|---|---|---|---|---|")
        for d in args.runs:
            t = kl_tracking([r["kl"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))],
                            args.target_kl)
            print(f"| {os.path.basename(os.path.normpath(d))} | {t['kl_max']:.2f} "
                  f"({t['kl_max_step']}) | {t['kl_abs_err']:.2f} | {t['kl_in_band']:.0%} | "
                  f"{t['kl_steps_above_2x']} |")
    if args.png:
        plot(args.runs, args.png, args.smooth, args.target_kl)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
