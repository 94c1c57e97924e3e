"""RLHF from a run directory: DPO, PPO or GRPO, chosen in gin (`rlhf.algorithm`).

    python -m experiments.rlhf --gin_file=gin_configs/debug/grpo_tiny.gin \
        [--gin_param='rlhf.base_run="runs/sft"' --gin_param='rlhf.run_dir="runs/grpo"' ...]

1. load the base run (an SFT or pretrained run directory, `llm.runs.load_run`) onto the mesh by
   the pretraining logical-axis rules: the policy and the frozen reference start from it;
2. write manifest.json + config.gin (the base run and its checkpoint step recorded);
3. hand over to the algorithm module (`ALGORITHMS`): `module.train(ctx)` trains, resuming from
   <run_dir>/checkpoints if there is one, and writes metrics.jsonl + TensorBoard;
4. write its final record to eval.json and the curves to plots/*.png.

`main` is the same plumbing as `experiments.pretrain_ntp`: parse_command_line, run, and
report_error (one line on stderr, exit 2) for bad settings, bad data and failing rewards.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys

import gin
import jax

from llm.config import ConfigError
from llm.model import transformer
from llm.posttrain.context import make_context
from llm.posttrain.plots import plot_rl_metrics
from llm.posttrain.rl_loop import is_chat_run, lora_plan
from llm.train import experiment
from llm.train.manifest import write_manifest

# rlhf.algorithm -> the module whose `train(ctx: RLHFContext) -> dict` runs it.
ALGORITHMS = {"dpo": "llm.posttrain.dpo", "ppo": "llm.posttrain.ppo", "grpo": "llm.posttrain.grpo"}


def _import_algorithms() -> None:
    """Import every algorithm module, so that their gin bindings are known before parsing."""
    for module in ALGORITHMS.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a module that is there but fails to import is a bug
                raise


def record_model(run_dir: str, base) -> None:
    """Make the run directory self-describing for `llm.runs.load_run` (evaluation, serving, a
    later RLHF stage): the base's ModelConfig and seq_len appended to config.gin (the model is
    not configured by this run's gin), and the base's tokenizer copied in."""
    lines = ["", "# The model, from the base run (experiments.rlhf):"]
    for field in dataclasses.fields(base.cfg):
        if field.name != "vocab_size":  # from the data record, as in pretraining
            lines.append(f"ModelConfig.{field.name} = {getattr(base.cfg, field.name)!r}")
    lines.append(f"TrainConfig.seq_len = {base.seq_len}")
    with open(os.path.join(run_dir, "config.gin"), "a") as f:
        f.write("\n".join(lines) + "\n")
    name = os.path.basename(base.manifest["data"]["tokenizer"])
    shutil.copyfile(base.tokenizer.model_path, os.path.join(run_dir, name))


@gin.configurable
def rlhf(run_dir: str = "runs/rlhf", base_run: str = "runs/sft", algorithm: str = "grpo",
         seed: int = 0) -> dict:
    """Align the policy of `base_run` with `algorithm` into `run_dir`. Returns the final record
    (also eval.json)."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"rlhf.algorithm={algorithm!r} is not one of "
                          f"{', '.join(map(repr, ALGORITHMS))}.")
    try:
        module = importlib.import_module(ALGORITHMS[algorithm])
    except ModuleNotFoundError as e:
        if e.name != ALGORITHMS[algorithm]:
            raise
        raise ConfigError(f"rlhf.algorithm={algorithm!r}: {ALGORITHMS[algorithm]} is not part "
                          "of this checkout.") from None
    ctx = make_context(run_dir, base_run, seed)
    base = ctx.base
    extra = {"objective": "rlhf", "algorithm": algorithm,
             "chat_template": is_chat_run(base.manifest),
             "base_run": {"run_dir": base.run_dir, "step": base.step,
                          "objective": base.manifest.get("objective")},
             "model": {"params": base.cfg.num_params()}}
    plan = lora_plan(ctx)
    if plan is not None:  # an adapter-only run: load_run merges it onto the base
        from llm.train import lora

        _, abstract_params, _ = transformer.abstract(base.cfg)
        extra["lora"] = lora.manifest_record(plan, abstract_params, base.run_dir, base.step)
    write_manifest(run_dir, mesh_shape={k: int(v) for k, v in ctx.mesh.shape.items()},
                   seed=seed, data=base.manifest.get("data", {}), extra=extra)
    if jax.process_index() == 0:
        record_model(run_dir, base)
    try:
        result = module.train(ctx)
    finally:
        ctx.writer.close()
        ctx.manager.close()
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot_rl_metrics(run_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line on stderr for a bad setting, bad data
    or a reward function that fails (`experiment.USER_ERRORS`)."""
    try:
        _import_algorithms()
        experiment.parse_command_line("rlhf", __doc__.split("\n\n")[0], argv)
        rlhf()
    except experiment.USER_ERRORS as e:
        return experiment.report_error("rlhf", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
