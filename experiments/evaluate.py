"""Evaluate a run directory on benchmark, bias and adversarial tasks; one report.

    python -m experiments.evaluate --run_dir=runs/quickstart \\
        --tasks=hellaswag=/data/hellaswag_val.jsonl,probes,counterfactual,my_task.yaml

Task names: see llm/eval/suite.py (`probes`, `counterfactual`, `<format>=<path>`, a task .yaml,
`robustness:<task>`). Writes runs/X/eval/<task>.json (metrics with bootstrap stderr, config and
per-sample records), runs/X/eval/summary.json, runs/X/eval/report.md and
runs/X/eval/plots/<task>.png. Every task is resolved and the checkpoint loaded before any work;
files are written only after every task finished (each one atomically, report.md last), so an
error leaves nothing that looks complete. Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from llm.config import ConfigError
from llm.data.sources import DataError


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def write_report(out_dir: str, run, results: dict[str, dict], command: list[str]) -> str:
    """report.md: one table per task (metric, value, stderr), with the run and command."""
    lines = [f"# Evaluation of `{run.name}`", "",
             f"- run: `{run.run_dir}` (checkpoint step {run.step})",
             f"- model: {run.cfg.num_params():,} parameters, context {run.seq_len} tokens",
             f"- command: `{' '.join(command)}`",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}", "",
             "Standard errors are bootstrap estimates (1000 resamples of the samples, seed 0); "
             "definitions in docs/evaluation.md.", ""]
    for name, result in results.items():
        lines += [f"## {name}", "", f"{result['num_samples']} samples; "
                  f"![{name}](plots/{name}.png)", "", "| metric | value | stderr |",
                  "|---|---:|---:|"]
        for metric, v in result["metrics"].items():
            extra = (f" (95% CI {_fmt(v['ci_low'])} .. {_fmt(v['ci_high'])})"
                     if "ci_low" in v else "")
            lines.append(f"| {metric} | {_fmt(v['value'])} | {_fmt(v['stderr'])}{extra} |")
        lines.append("")
    path = os.path.join(out_dir, "report.md")
    _atomic_write(path, "\n".join(lines))
    return path


def plot_task(path: str, name: str, metrics: dict) -> None:
    """Horizontal bars with stderr whiskers, one per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, v) for k, v in metrics.items() if not math.isnan(v["value"])]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.2))
    names = [k for k, _ in items]
    values = [v["value"] for _, v in items]
    errors = [0.0 if math.isnan(v["stderr"]) else v["stderr"] for _, v in items]
    ax.barh(range(len(items)), values, xerr=errors, color="#4c72b0", capsize=3)
    ax.set_yticks(range(len(items)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(name)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _clean(obj):
    """NaN -> None so the JSON is standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def evaluate(run_dir: str, tasks: list[str], *, step: int | None = None, batch_size: int = 8,
             out_dir: str | None = None, probe_files: tuple[str, ...] = (),
             max_length: int | None = None, command: list[str] | None = None) -> dict:
    """Run `tasks` on the run's checkpoint; returns {task: result} and writes the files."""
    from tqdm.auto import tqdm

    from llm.eval import suite
    from llm.eval.lm import LanguageModel
    from llm.runs import load_run

    if not tasks:
        raise ConfigError(f"--tasks is empty; valid: {suite.valid_names()}.")
    resolved = [suite.resolve(t, probe_files) for t in tasks]
    names = [t.name for t in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks names a task twice ({', '.join(names)}).")
    run = load_run(run_dir, step=step)
    lm = LanguageModel(run, batch_size=batch_size, max_length=max_length, progress=True)
    results: dict[str, dict] = {}
    bar = tqdm(resolved, desc="tasks", unit="task", disable=len(resolved) < 2)
    for task in bar:
        bar.set_postfix_str(task.name)
        start = time.time()
        result = task.run(lm)
        result.setdefault("num_samples", len(result["samples"]))
        result.update(task=task.name, kind=task.kind, seconds=round(time.time() - start, 2),
                      run_dir=run.run_dir, step=run.step, batch_size=batch_size,
                      max_length=lm.max_length)
        results[task.name] = result
    out_dir = out_dir or os.path.join(run.run_dir, "eval")
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    for name, result in results.items():
        _atomic_write(os.path.join(out_dir, f"{name}.json"),
                      json.dumps(_clean(result), indent=1))
        plot_task(os.path.join(out_dir, "plots", f"{name}.png"), name, result["metrics"])
    summary = {name: r["metrics"] for name, r in results.items()}
    _atomic_write(os.path.join(out_dir, "summary.json"),
                  json.dumps(_clean({"run_dir": run.run_dir, "step": run.step,
                                     "tasks": summary}), indent=1))
    write_report(out_dir, run, results, command or sys.argv)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="runs/<name>/ of a decoder-only run")
    parser.add_argument("--tasks", action="append", default=[],
                        help="comma-separated task names / paths (repeatable)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None,
                        help="context in tokens (default: the run's training seq_len)")
    parser.add_argument("--probes", action="append", default=[],
                        help="extra probe JSONL files for the `probes` task")
    parser.add_argument("--out_dir", default=None, help="default: <run_dir>/eval")
    args = parser.parse_args(argv)
    tasks = [t for arg in args.tasks for t in arg.split(",") if t.strip()]
    try:
        results = evaluate(args.run_dir, tasks, step=args.step, batch_size=args.batch_size,
                           out_dir=args.out_dir, probe_files=tuple(args.probes),
                           max_length=args.max_length,
                           command=["python", "-m", "experiments.evaluate", *(argv or
                                                                              sys.argv[1:])])
    except (ConfigError, DataError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    for name, result in results.items():
        shown = ", ".join(f"{k} {_fmt(v['value'])}" for k, v in list(result["metrics"].items())[:4])
        print(f"evaluate: {name}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
