"""Compare two decoder runs on a task family of `llm.posttrain.tasks`, prompt by prompt.

    python -m tools.task_compare --runs runs/dpo runs/sft --task code --split heldout --num 256

Both runs continue the same prompts greedily (`--temperature 0`, the default) or by sampling with
one key, chat-templated (`--prompt_format chat`, default for SFT/RLHF runs) or raw; each completion
is scored by the task's reward. Prints per-run means and the paired difference (mean, standard
error over prompts, prompts better / worse) as a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from llm.config import ConfigError
from llm.data.sources import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.task_compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs=2, required=True, metavar=("RUN_A", "RUN_B"))
    parser.add_argument("--task", default="code")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="which problems (tasks seed)")
    parser.add_argument("--reward", default="", help="reward name (default: the task's)")
    parser.add_argument("--prompt_format", default="auto", choices=("auto", "raw", "chat"))
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        from llm.posttrain import pairs, tasks
        from llm.runs import load_run

        examples = tasks.make_examples(args.task, args.split, args.num, seed=args.seed)
        reward = args.reward or tasks.default_reward(args.task)
        scores = {}
        for path in args.runs:
            run = load_run(path)
            fmt = pairs.TaskPairs(task=args.task, prompt_format=args.prompt_format
                                  ).resolved_format(run.manifest)
            if fmt == "raw" and run.manifest.get("objective") == "rlhf":
                fmt = "chat" if run.manifest.get("chat_template") else "raw"
            comps = pairs.sample_completions(
                run.graphdef, run.params, run.cfg, run.tokenizer, [e.prompt for e in examples],
                samples=args.samples, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, seed=args.seed, prompt_format=fmt)
            scores[path] = np.array([tasks.score(reward, [e.prompt] * len(c), c,
                                                 [e.reference] * len(c)).mean()
                                     for e, c in zip(examples, comps)])
            print(f"{path}: mean {reward} {scores[path].mean():.4f} over {len(examples)} "
                  f"{args.task} {args.split} prompts ({fmt} prompts, temperature "
                  f"{args.temperature}, {args.samples} sample(s))")
    except (ConfigError, DataError) as e:
        print(f"task_compare: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    a, b = (scores[p] for p in args.runs)
    d = a - b
    out = {"runs": args.runs, "task": args.task, "split": args.split, "reward": reward,
           "n": len(d), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
           "gain": float(d.mean()), "paired_stderr": float(d.std(ddof=1) / np.sqrt(len(d))),
           "better": int((d > 0).sum()), "worse": int((d < 0).sum()),
           "temperature": args.temperature, "samples": args.samples}
    print(f"gain (A - B) {out['gain']:+.4f} +- {out['paired_stderr']:.4f} (paired standard "
          f"error), A better on {out['better']} prompts, worse on {out['worse']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
