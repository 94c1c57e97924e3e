"""Distilled students against the same students trained from scratch: validation bits per byte
over training, one PNG with every run's curve, a markdown table and a JSON record.

    python -m tools.distill_report --distilled runs/kd_seed0,runs/kd_seed1 \
        --scratch runs/scratch_seed0,runs/scratch_seed1 --out docs/distill_quickstart

Reads each run directory's eval_metrics.jsonl (intermediate passes on `TrainConfig.eval_batches`
batches, the final pass on the whole validation split) and eval.json. Writes <out>.png and
<out>.json and prints the table. Runs are paired by position (same seed, same batches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from llm.train.metrics import read_metrics


def curve(run_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["bits_per_byte"])
            for r in read_metrics(os.path.join(run_dir, "eval_metrics.jsonl"))]


def final(run_dir: str) -> dict:
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        raise SystemExit(f"distill_report: error: {path} does not exist; the run has not "
                         "finished.")
    with open(path) as f:
        return json.load(f)


def plot(distilled: list[str], scratch: list[str], out: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for runs, color, label in ((distilled, "tab:blue", "distilled"),
                               (scratch, "tab:orange", "from scratch")):
        for run in runs:
            steps, bpb = zip(*curve(run))
            ax.plot(steps, bpb, "o-", color=color, ms=3, lw=1.2, alpha=0.9,
                    label=f"{label} ({os.path.basename(os.path.normpath(run))})")
    teacher = final(distilled[0]).get("teacher_bits_per_byte")
    if teacher:
        ax.axhline(teacher, color="gray", ls="--", lw=1, label=f"teacher ({teacher:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png")
    plt.close(fig)
    return out + ".png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.distill_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--distilled", required=True, help="comma-separated run directories")
    parser.add_argument("--scratch", required=True, help="comma-separated run directories, "
                        "paired with --distilled by position")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--title", default="distilled vs from-scratch student")
    args = parser.parse_args(argv)
    distilled, scratch = args.distilled.split(","), args.scratch.split(",")
    if len(distilled) != len(scratch):
        print("distill_report: error: --distilled and --scratch need the same number of runs "
              "(paired by seed).", file=sys.stderr)
        return 2
    rows = []
    for d, s in zip(distilled, scratch):
        fd, fs = final(d), final(s)
        rows.append({"distilled": d, "scratch": s, "step": fd["step"],
                     "distilled_bits_per_byte": fd["bits_per_byte"],
                     "scratch_bits_per_byte": fs["bits_per_byte"],
                     "delta": fd["bits_per_byte"] - fs["bits_per_byte"],
                     "teacher_bits_per_byte": fd.get("teacher_bits_per_byte")})
    deltas = [r["delta"] for r in rows]
    summary = {"pairs": rows, "mean_delta": statistics.fmean(deltas),
               "max_delta": max(deltas),
               "stdev_delta": statistics.stdev(deltas) if len(deltas) > 1 else None}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    png = plot(distilled, scratch, args.out, args.title)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print("| pair | steps | distilled bits/byte | scratch bits/byte | difference |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {os.path.basename(r['distilled'])} / {os.path.basename(r['scratch'])} | "
              f"{r['step']} | {r['distilled_bits_per_byte']:.4f} | "
              f"{r['scratch_bits_per_byte']:.4f} | {r['delta']:+.4f} |")
    print(f"mean difference {summary['mean_delta']:+.4f} bits/byte over {len(rows)} pairs; "
          f"wrote {png} and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
