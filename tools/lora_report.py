"""Compare a LoRA (or QLoRA) fine-tuning run with a full fine-tuning run of the same task.

  .venv/bin/python -m tools.lora_report --lora runs/lora_sft --full runs/sft_tasks [--json F]

Reads both run directories as they are (nothing is trained):

  response loss / task scores   eval.json of each run (validation loss on response tokens, the
                                held-out greedy task scores);
  trainable params              the arrays of `state.params` in the latest checkpoint (LoRA: the
                                adapters and any `train_also` parameters);
  optimizer-state bytes         the floating-point arrays of `state.opt_state` in that checkpoint;
  merged == unmerged            for the LoRA run: logits of `load_run`'s merged parameters against
                                the adapted forward `lora.combine(adapters, base)` (QLoRA: the
                                quantized base) on validation-sized rows, max |difference|.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from llm.model import transformer  # noqa: E402
from llm.runs import checkpoint_steps, load_run  # noqa: E402
from llm.train import lora  # noqa: E402


def checkpoint_arrays(run_dir: str) -> dict:
    """state.params and state.opt_state of the latest checkpoint, as restored arrays."""
    step = checkpoint_steps(run_dir)[-1]
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"),
                                    item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore()))["state"]
    finally:
        manager.close()


def sizes(state: dict) -> dict:
    params = sum(int(np.size(x)) for x in jax.tree.leaves(state["params"]))
    opt = sum(int(np.size(x)) * np.asarray(x).dtype.itemsize
              for x in jax.tree.leaves(state["opt_state"])
              if np.issubdtype(np.asarray(x).dtype, np.floating))
    return {"trainable_params": params, "optimizer_bytes": opt}


def merged_vs_unmerged(run_dir: str, rows: int = 4, seq: int = 128) -> float:
    """max |logits(merged params) - logits(combine(adapters, frozen base))| on random rows."""
    run = load_run(run_dir)
    record = run.manifest["lora"]
    graphdef, abstract_params, axes = transformer.abstract(run.cfg)
    plan = lora.plan_from_record(record, graphdef, abstract_params, axes)
    base = load_run(record["base_run"], record["base_step"]).params
    extra = run.cfg.vocab_size - base["embed"]["embedding"].shape[0]
    if extra:
        from llm.posttrain.init import extend_params

        base = extend_params(base, extra)
    adapters = checkpoint_arrays(run_dir)["params"]
    ids = jax.random.randint(jax.random.key(0), (rows, seq), 0, run.cfg.vocab_size)
    merged = jax.jit(lambda p: transformer.apply(graphdef, p, ids))(run.params)
    frozen = lora.freeze(plan, base)
    unmerged = jax.jit(lambda a, f: transformer.apply(graphdef, lora.combine(plan, a, f), ids))(
        adapters, frozen)
    return float(jnp.max(jnp.abs(merged - unmerged)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", action="append", required=True, help="LoRA run dir (repeatable)")
    p.add_argument("--full", required=True, help="full fine-tuning run dir")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = {}
    for name, run_dir in [("full", args.full)] + [(os.path.basename(os.path.normpath(d)), d)
                                                   for d in args.lora]:
        with open(os.path.join(run_dir, "eval.json")) as f:
            ev = json.load(f)
        with open(os.path.join(run_dir, "manifest.json")) as f:
            manifest = json.load(f)
        row = {"run_dir": os.path.abspath(run_dir), "loss": ev["loss"],
               "task_score": {k: v.get("sft") if isinstance(v, dict) else v
                              for k, v in (ev.get("task_score") or {}).items()},
               **sizes(checkpoint_arrays(run_dir))}
        if "lora" in manifest:
            row["lora"] = {k: manifest["lora"]["config"][k] for k in ("rank", "alpha", "quant",
                                                                     "train_also")}
            row["merged_vs_unmerged_max_abs"] = merged_vs_unmerged(run_dir)
        out[name] = row
    full = out["full"]
    print("| run | response loss | task scores (held-out, greedy) | trainable (share) | "
          "optimizer bytes (share) | merged vs unmerged |")
    print("|---|---|---|---|---|---|")
    for name, r in out.items():
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r["task_score"].items() if v is not None)
        mvu = r.get("merged_vs_unmerged_max_abs")
        print(f"| {name} | {r['loss']:.4f} | {scores} | {r['trainable_params']:,} "
              f"({r['trainable_params'] / full['trainable_params']:.3f}) | "
              f"{r['optimizer_bytes']:,} ({r['optimizer_bytes'] / full['optimizer_bytes']:.3f}) | "
              f"{'-' if mvu is None else f'{mvu:.1e}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
