"""Train a reward model (decoder + scalar head, Bradley-Terry loss) on chosen/rejected pairs.

    python -m experiments.reward --gin_file=gin_configs/debug/reward_tiny.gin \
        --gin_param='reward.base_run="runs/sft"' --gin_param='reward.run_dir="runs/rm"' \
        --gin_param='reward.train_pairs="pairs/train.jsonl"' \
        [--gin_param='reward.heldout_pairs="pairs/heldout.jsonl"']

1. load the base run (`llm.runs.load_run`: a pretrained or SFT decoder) straight into its
   logical-axis shardings on the mesh, and add the scalar head (`llm.posttrain.reward_model`);
2. read the pairs (`llm.posttrain.pairs.read_pairs`: a malformed line is one error naming
   file:line); without `heldout_pairs`, a stable `heldout_fraction` of the train file (by a hash
   of the pair) is held out;
3. train with the shared jitted `train_step` and loop (checkpoints with the grain iterator,
   SIGTERM, exact resume, metrics.jsonl, TensorBoard);
4. report the held-out pair accuracy (share of pairs whose chosen response scores higher) before
   and after training, in eval.json, with plots/reward_model.png.

The run directory follows the contract (manifest.json with objective "reward_model",
config.gin, checkpoints/, metrics.jsonl, eval_metrics.jsonl, tb/, plots/, eval.json) and holds a
copy of the tokenizer; `llm.posttrain.reward_model.load(run_dir)` opens it to score texts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np

from llm import runs
from llm.config import ConfigError
from llm.eval.perplexity import accumulate
from llm.parallel.mesh import make_mesh, mesh_shape
from llm.parallel.rules import axis_rules
from llm.posttrain import pairs as pairs_lib
from llm.posttrain import reward_model
from llm.runs import load_run
from llm.train import checkpoint, experiment
from llm.train.loop import TrainConfig, to_global, train_loop
from llm.train.manifest import write_manifest
from llm.train.metrics import MetricsWriter, peak_flops, read_metrics
from llm.train.optimizer import make_optimizer
from llm.train.state import TrainState, create_train_state
from llm.train.step import batch_sharding, jit_eval_step, jit_train_step


def summarize(sums: dict[str, float]) -> dict:
    """Eval sums -> per-pair loss, accuracy with its 95% Wilson interval (accuracy_lo /
    accuracy_hi), mean margin and the pair count."""
    pairs = max(sums["tokens"], 1.0)
    lo, hi = pairs_lib.wilson_interval(sums["correct"], sums["tokens"])
    return {"loss": sums["nll"] / pairs, "accuracy": sums["correct"] / pairs,
            "accuracy_lo": lo, "accuracy_hi": hi,
            "mean_margin": sums["margin"] / pairs, "pairs": int(sums["tokens"])}


def plot(run_dir: str, initial: dict | None, final: dict) -> str:
    """plots/reward_model.png: training Bradley-Terry loss and pair accuracy; held-out accuracy
    before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_metrics(os.path.join(run_dir, "eval_metrics.jsonl"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    steps = [r["step"] for r in train]
    a1.plot(steps, [r["loss"] for r in train], lw=1, label="train")
    a1.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out")
    a1.set_xlabel("step")
    a1.set_ylabel("Bradley-Terry loss (nats/pair)")
    a1.axhline(np.log(2), color="grey", lw=0.5, ls="--")
    a1.legend()
    a2.plot(steps, [r["accuracy"] for r in train], lw=1, alpha=0.6, label="train (batch)")
    a2.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="held-out")
    if initial is not None:
        a2.plot([0], [initial["accuracy"]], "s", label="held-out, initial")
    a2.axhline(0.5, color="grey", lw=0.5, ls="--")
    a2.set_xlabel("step")
    a2.set_ylabel("pair accuracy")
    a2.set_title(f"held-out accuracy {final['accuracy']:.3f} ({final['pairs']} pairs)")
    a2.legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "plots", "reward_model.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


@gin.configurable
def reward(run_dir: str = "runs/reward", base_run: str = "runs/quickstart",
           train_pairs: str = "", heldout_pairs: str = "", heldout_fraction: float = 0.1,
           center_coef: float = 0.0) -> dict:
    """Train the reward model; returns the final held-out record (also eval.json).

    base_run: the decoder the model starts from (pretrained or SFT run directory).
    train_pairs / heldout_pairs: chosen/rejected JSONL (`llm.posttrain.pairs`). train_pairs ""
      builds the pairs from the base's own samples ranked by a task reward (gin: TaskPairs.*),
      written to <run_dir>/pairs/.
    heldout_fraction: share of train_pairs' prompts held out when heldout_pairs is "".
    center_coef: TRL's center_rewards_coefficient (0 = plain Bradley-Terry).
    """
    tc = TrainConfig()
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"reward.heldout_fraction={heldout_fraction} must be in [0, 1).")
    if train_pairs:  # read (and checked) before any model work
        train = pairs_lib.read_pairs(train_pairs)
        if heldout_pairs:
            heldout = pairs_lib.read_pairs(heldout_pairs)
        else:
            train, heldout = pairs_lib.split_heldout(train, heldout_fraction)
    elif heldout_pairs:
        raise ConfigError("reward.heldout_pairs is set but reward.train_pairs is not; set both, "
                          "or neither (pairs sampled from the base, TaskPairs.*).")
    mesh, rules = make_mesh(), axis_rules()
    experiment.check_batch_fits_mesh(tc, mesh, rules)
    base = load_run(base_run, mesh=mesh, rules=rules)
    cfg = base.cfg
    cfg.check_seq_len(tc.seq_len)
    if not train_pairs:  # the base policy's own samples, ranked by a task reward
        source = pairs_lib.TaskPairs()
        source = dataclasses.replace(source,
                                     prompt_format=source.resolved_format(base.manifest))
        pair_dir = os.path.join(run_dir, "pairs")
        stats = source.build(base.graphdef, base.params, cfg, base.tokenizer, pair_dir)
        print(f"reward: {stats['train']['pairs']} train / {stats['heldout']['pairs']} held-out "
              f"pairs from {source.samples} samples of the base on task {source.task!r} "
              f"(reward {source.reward_name!r}), in {pair_dir}")
        train = pairs_lib.read_pairs(os.path.join(pair_dir, "train.jsonl"))
        heldout = pairs_lib.read_pairs(os.path.join(pair_dir, "heldout.jsonl"))
    if not train or not heldout:
        raise ConfigError(f"reward: {len(train)} train and {len(heldout)} held-out pairs; both "
                          "need at least one (set reward.heldout_pairs or "
                          "reward.heldout_fraction).")

    graphdef, abstract, axes = reward_model.abstract_params(cfg)

    def init(key):  # the base decoder (a copy: the step donates the state) and a fresh head
        return {"decoder": jax.tree.map(jnp.copy, base.params),
                "head": reward_model.init_head(cfg, key)}
    init.loads_params = True
    loss_fn = reward_model.bt_loss_fn(graphdef, center_coef)
    tx, schedule = make_optimizer(total_steps=tc.steps)
    state, shardings = create_train_state(init, abstract, axes, tx, mesh, rules, seed=tc.seed)
    train_step = jit_train_step(shardings, mesh, rules, loss_fn=loss_fn, tx=tx,
                                schedule=schedule, accum_steps=tc.accum_steps)
    eval_step = jit_eval_step(shardings.params, mesh, rules, loss_fn)
    batch_shard = batch_sharding(mesh, rules)

    train_rows, train_cut = pairs_lib.encode_pairs(base.tokenizer, train, tc.seq_len)
    heldout_rows, heldout_cut = pairs_lib.encode_pairs(base.tokenizer, heldout, tc.seq_len)
    if len(train) < tc.global_batch_size:
        raise ConfigError(f"reward: {len(train)} train pairs are fewer than "
                          f"TrainConfig.global_batch_size={tc.global_batch_size}; lower it or "
                          "add pairs.")
    heldout_rows = pairs_lib.pad_to_multiple(heldout_rows, tc.global_batch_size)
    heldout_batches = [{k: v[i:i + tc.global_batch_size] for k, v in heldout_rows.items()}
                       for i in range(0, len(heldout_rows["chosen"]), tc.global_batch_size)]
    data_iter = iter(pairs_lib.pair_dataset(train_rows, tc.global_batch_size, tc.seed))

    def evaluate(state: TrainState, max_batches: int | None) -> dict:
        return summarize(accumulate(eval_step, state.params, heldout_batches,
                                    lambda b: to_global(b, batch_shard), max_batches))

    initial = evaluate(state, None)  # the base decoder with the untrained head
    manager = checkpoint.checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    restored = checkpoint.restore_latest(manager, state, data_iter)
    if restored is not None:
        state = restored
        print(f"reward: resumed from step {int(state.step)} of {tc.steps}")
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        data = base.manifest["data"]  # the tokenizer travels with the reward model
        shutil.copyfile(runs.tokenizer_path(base.run_dir, data),
                        os.path.join(run_dir, os.path.basename(data["tokenizer"])))
    record = {"base_run": base.run_dir, "base_step": base.step, "seq_len": tc.seq_len,
              "model_config": dataclasses.asdict(cfg),
              "center_coef": center_coef,
              "train_pairs": os.path.abspath(train_pairs) if train_pairs else "TaskPairs",
              "heldout_pairs": os.path.abspath(heldout_pairs) if heldout_pairs else None,
              "num_train": len(train), "num_heldout": len(heldout), "train_cut": train_cut,
              "heldout_cut": heldout_cut}
    write_manifest(run_dir, mesh_shape=mesh_shape(mesh), seed=tc.seed, data=base.manifest["data"],
                   extra={"objective": reward_model.KIND, "reward_model": record,
                          "model": {"params": cfg.num_params() + cfg.d_model + 1}})
    writer = MetricsWriter(run_dir)
    peak, peak_source = peak_flops()
    flops_per_step = 2 * cfg.flops_per_token(tc.seq_len) * tc.seq_len * tc.global_batch_size
    print(f"reward: base {base.run_dir} step {base.step}, {len(train)} train / {len(heldout)} "
          f"held-out pairs ({train_cut + heldout_cut} cut to {tc.seq_len} tokens), mesh "
          f"{mesh_shape(mesh)}; held-out accuracy at start {initial['accuracy']:.3f}")
    state, status = train_loop(cfg=tc, state=state, step_fn=train_step, data_iter=data_iter,
                               batch_sharding=batch_shard, manager=manager, writer=writer,
                               flops_per_step=flops_per_step,
                               peak_flops_total=peak * jax.device_count(), evaluate=evaluate)
    if status == "preempted":
        print(f"reward: stopped by signal at step {int(state.step)}; checkpoint written.")
        writer.close()
        return {"status": status, "step": int(state.step)}
    result = {**evaluate(state, None), "step": int(state.step)}
    result["initial_accuracy"], result["initial_loss"] = initial["accuracy"], initial["loss"]
    writer.write(int(state.step), result, prefix="eval")
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot(run_dir, initial, result)
        print(f"reward: held-out pair accuracy {result['accuracy']:.3f} (95% Wilson interval "
              f"{result['accuracy_lo']:.3f}-{result['accuracy_hi']:.3f}) on {result['pairs']} "
              f"pairs (at start {initial['accuracy']:.3f}), "
              f"Bradley-Terry loss {result['loss']:.4f}; peak {peak / 1e9:.0f} GFLOP/s "
              f"({peak_source})")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line on stderr for a bad setting or bad
    data (`experiment.USER_ERRORS`)."""
    try:
        experiment.parse_command_line("reward", __doc__.split("\n\n")[0], argv)
        reward()
    except experiment.USER_ERRORS as e:
        return experiment.report_error("reward", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
