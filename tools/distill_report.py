"""Distilled students against the same students trained from scratch: validation bits per byte
over training, one PNG with every run's curve, a markdown table and a JSON record.

    python -m tools.distill_report --distilled runs/kd_seed0,runs/kd_seed1 \
        --scratch runs/scratch_seed0,runs/scratch_seed1 --out docs/distill_quickstart

Reads each run directory's eval_metrics.jsonl (intermediate passes on `TrainConfig.eval_batches`
batches, the final pass on the whole validation split) and eval.json. Writes <out>.png and
<out>.json and prints the table. Runs are paired by position (same seed, same batches).

Many arms at once (`tools/distill_arms.sh` writes <dir>/<arm>_seed<k>/):

    python -m tools.distill_report --arms_dir runs/distill_arms --baseline scratch \
        --out docs/distill_arms

groups the run directories by arm, labels each from its manifest's `distill` record (loss,
mode, on-policy share), pairs every arm with the baseline by seed, and writes one PNG (the mean
curve of each arm, its seeds as thin lines), <out>.json and a markdown table.
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
    return save_bits_per_byte_plot(fig, ax, final(distilled[0]).get("teacher_bits_per_byte"),
                                   title, out + ".png")


def save_bits_per_byte_plot(fig, ax, teacher: float | None, title: str, path: str) -> str:
    """Finish a validation-bits-per-byte-by-step plot (the teacher as a dashed line) and write
    it to `path`."""
    import matplotlib.pyplot as plt

    if teacher:
        ax.axhline(teacher, color="gray", ls="--", lw=1, label=f"teacher ({teacher:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def arm_label(run_dir: str) -> str:
    """What an arm trained on, from its manifest's `distill` record."""
    with open(os.path.join(run_dir, "manifest.json")) as f:
        record = json.load(f)["distill"]
    loss, on_policy = record["loss"], record.get("on_policy") or {}
    if loss["alpha"] == 1.0:
        return "from scratch (hard labels only)"
    name = {"forward_kl": "forward KL", "reverse_kl": "reverse KL",
            "jsd": f"JSD (beta {loss['beta']:g})"}[loss["divergence"]]
    if loss["temperature"] != 1.0:
        name += f", T {loss['temperature']:g}"
    if loss["alpha"]:
        name += f" + {loss['alpha']:g} x hard labels"
    if record["mode"] == "offline":
        name += f", offline top-{record['top_k']}"
    if on_policy.get("fraction"):
        name += f", on-policy {on_policy['fraction']:g} (GKD)"
    return name


def collect_arms(arms_dir: str) -> dict[str, dict[int, str]]:
    """{arm: {seed: run dir}} for every finished <arms_dir>/<arm>_seed<k>/ (eval.json present)."""
    arms: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(arms_dir)):
        path = os.path.join(arms_dir, name)
        arm, sep, seed = name.rpartition("_seed")
        if sep and seed.isdigit() and os.path.isfile(os.path.join(path, "eval.json")):
            arms.setdefault(arm, {})[int(seed)] = path
    return arms


def arms_report(arms_dir: str, baseline: str, out: str, title: str) -> int:
    arms = collect_arms(arms_dir)
    if baseline not in arms:
        print(f"distill_report: error: no finished '{baseline}_seed<k>' run in {arms_dir} "
              f"(found arms: {', '.join(arms) or 'none'}); pass --baseline=<arm>.",
              file=sys.stderr)
        return 2
    teacher = None
    rows = []
    for arm, runs in arms.items():
        finals = {seed: final(run) for seed, run in sorted(runs.items())}
        teacher = teacher or next(iter(finals.values())).get("teacher_bits_per_byte")
        deltas = [f["bits_per_byte"] - final(arms[baseline][seed])["bits_per_byte"]
                  for seed, f in finals.items() if seed in arms[baseline]]
        bpb = [f["bits_per_byte"] for f in finals.values()]
        rows.append({"arm": arm, "label": arm_label(next(iter(runs.values()))),
                     "seeds": sorted(runs), "bits_per_byte": bpb,
                     "mean_bits_per_byte": statistics.fmean(bpb),
                     "delta_vs_baseline": deltas,
                     "mean_delta": statistics.fmean(deltas) if deltas else None,
                     "step": next(iter(finals.values()))["step"], "runs": runs})
    rows.sort(key=lambda r: r["mean_bits_per_byte"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        color = "black" if r["arm"] == baseline else colors[i % len(colors)]
        curves = [dict(curve(run)) for run in r["runs"].values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        for c in curves:
            ax.plot(sorted(c), [c[s] for s in sorted(c)], "-", color=color, lw=0.6, alpha=0.35)
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], "o-",
                color=color, ms=3, lw=1.6, label=f"{r['label']} (n={len(curves)})")
    save_bits_per_byte_plot(fig, ax, teacher, title, out + ".png")
    with open(out + ".json", "w") as f:
        json.dump({"baseline": baseline, "teacher_bits_per_byte": teacher, "arms": rows}, f,
                  indent=2)
    print("| arm | seeds | validation bits/byte (per seed) | mean | vs scratch (mean, paired) |")
    print("|---|---|---|---|---|")
    for r in rows:
        delta = "" if r["arm"] == baseline or r["mean_delta"] is None else \
            f"{r['mean_delta']:+.4f}"
        print(f"| {r['label']} | {len(r['seeds'])} | "
              f"{' / '.join(f'{b:.4f}' for b in r['bits_per_byte'])} | "
              f"{r['mean_bits_per_byte']:.4f} | {delta} |")
    print(f"teacher {teacher}; wrote {out}.png and {out}.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.distill_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--distilled", help="comma-separated run directories")
    parser.add_argument("--scratch", help="comma-separated run directories, "
                        "paired with --distilled by position")
    parser.add_argument("--arms_dir", help="a directory of <arm>_seed<k> run directories "
                        "(instead of --distilled/--scratch)")
    parser.add_argument("--baseline", default="scratch", help="with --arms_dir: the arm the "
                        "others are compared with, by seed")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--title", default="distilled vs from-scratch student")
    args = parser.parse_args(argv)
    if args.arms_dir:
        return arms_report(args.arms_dir, args.baseline, args.out, args.title)
    if not (args.distilled and args.scratch):
        print("distill_report: error: pass --distilled and --scratch, or --arms_dir.",
              file=sys.stderr)
        return 2
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
