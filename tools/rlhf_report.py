"""Summarise RL runs over seeds: held-out reward gain over the reference (the SFT policy), KL to
the reference, and one PNG of the reward and KL curves of every run.

  .venv/bin/python -m tools.rlhf_report runs/grpo_code_s{0,1,2} runs/ppo_code_s{0,1,2} \
      --png docs/rlhf_curves.png --json rlhf_report.json

Each run directory is an `experiments.rlhf` run (eval.json: reward_policy, reward_reference,
kl_policy; metrics.jsonl: reward and kl per step). Runs are grouped by their algorithm.
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
             "train_reward_last5": statistics.mean(r["reward"] for r in records[-5:])})
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
                     "train_kl_max": max(r["train_kl_max"] for r in runs)}
    return out


def plot(run_dirs: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for d in run_dirs:
        records = read_metrics(os.path.join(d, "metrics.jsonl"))
        label = os.path.basename(os.path.normpath(d))
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["reward"] for r in records], lw=1, label=label)
        axes[1].plot(steps, [r["kl"] for r in records], lw=1, label=label)
    axes[0].set_title("training reward (mean over the step's samples)")
    axes[1].set_title("KL(policy || SFT reference), nats per sequence (k1)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
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
    args = p.parse_args(argv)
    summary = summarise(args.runs)
    print("| algorithm | seeds | reference reward | policy reward | gain (mean +- sd, min) | "
          "held-out KL (nats/seq) | max training KL |\n|---|---|---|---|---|---|---|")
    for algo, s in summary.items():
        print(f"| {algo} | {', '.join(map(str, s['seeds']))} | {s['reward_reference_mean']:.3f} "
              f"| {s['reward_policy_mean']:.3f} | {s['gain_mean']:+.3f} +- {s['gain_sd']:.3f}, "
              f"min {s['gain_min']:+.3f} | {s['kl_policy_mean']:.2f} | {s['train_kl_max']:.2f} |")
    if args.png:
        plot(args.runs, args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
