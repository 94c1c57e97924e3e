"""Direct preference optimisation (DPO) and IPO against a frozen reference.

    python -m experiments.rlhf --gin_file=gin_configs/debug/dpo_tiny.gin \
        --gin_param='rlhf.base_run="runs/sft"' --gin_param='rlhf.run_dir="runs/dpo"'

The losses, with pi/ref the summed log-probabilities of a response's tokens (its EOS included)
under the policy and the reference, and h = (pi_c - pi_r) - (ref_c - ref_r):

    sigmoid (DPO, Rafailov et al. 2023):  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
                                           (e = label_smoothing: conservative DPO; 0 = plain DPO)
    ipo (Azar et al. 2023):                (h - 1 / (2 beta))^2, with log-probabilities averaged
                                           over each response's tokens (as TRL's `loss_type="ipo"`)

and the implicit rewards r = beta (pi - ref) of the chosen and the rejected response; the
"implicit-reward accuracy" is the share of pairs with r_chosen > r_rejected (a tie counts 1/2, so
the policy at the reference scores 0.5). These are TRL's `DPOTrainer` formulas.

The reference is frozen, so its per-token log-probabilities are computed once for every pair
before training (TRL's `precompute_ref_log_probs`), by a jitted forward pass sharded like
training, and travel with the batch as [batch, seq] fields. No second model is held during
training and every step is the shared `llm.train.step.train_step` with `dpo_loss_fn`: the same
jit, shardings, gradient accumulation and loop (checkpoints with the data position, SIGTERM,
exact resume) as pretraining. With `LoraConfig.enabled=True` the trainable params are LoRA
adapters and the loss sees `lora.combine(adapters, frozen base)` (`lora.adapted_loss`); the
reference is then the base itself.

Pairs come from chosen/rejected JSONL (`DPOConfig.train_pairs`, e.g. human-review ratings) or,
by default, from the base policy's own samples ranked by a task reward
(`llm.posttrain.pairs.TaskPairs`). With task pairs the run ends by sampling held-out task prompts
from the policy and from the reference with one key and comparing their mean task reward.
"""

from __future__ import annotations

import dataclasses
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm.config import ConfigError
from llm.eval.perplexity import accumulate
from llm.model import transformer
from llm.parallel.rules import activation_sharding
from llm.posttrain import pairs as pairs_lib
from llm.posttrain.context import RLHFContext, token_logprobs
from llm.train import checkpoint, experiment, lora
from llm.train.loop import TrainConfig, to_global, train_loop
from llm.train.metrics import peak_flops
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, jit_eval_step, jit_train_step

LOSS_TYPES = ("sigmoid", "ipo")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO settings (gin: DPOConfig.*); the step count, batch (pairs per step), row length and
    seed are TrainConfig's, the optimizer make_optimizer's.

    beta: the strength of the KL regularisation (DPO's beta; IPO's tau).
    loss_type: "sigmoid" (DPO) or "ipo".
    label_smoothing: conservative DPO's assumed label-noise rate (sigmoid only).
    train_pairs / heldout_pairs: chosen/rejected JSONL files; "" = pairs sampled from the base
      policy and ranked by a task reward (`pairs.TaskPairs`), written to <run_dir>/pairs/.
    eval_samples: completions per held-out task prompt for the final mean task reward (task
      pairs only; 0 skips it).
    rpo_alpha: weight of the chosen responses' negative log-likelihood (per token, averaged per
      pair) added to each pair's loss (RPO, Pang et al. 2024 "Iterative Reasoning Preference
      Optimization"; TRL's `rpo_alpha`); 0 = plain DPO/IPO.
    rounds: iterative (on-policy) DPO: TrainConfig.steps are split into `rounds` equal rounds;
      round 0 trains on the base's pairs, each later round on pairs sampled afresh from the policy
      as the previous round left it (fresh train prompts, `TaskPairs.samples` at
      `TaskPairs.temperature`, best vs worst), against the same frozen reference (the base), as
      online DPO (Guo et al. 2024) / iterative DPO (Xu et al. 2023). With `train_pairs` (e.g.
      a human-review export) round 0 trains on that file and the later rounds sample the task
      of `TaskPairs.*`.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    train_pairs: str = ""
    heldout_pairs: str = ""
    eval_samples: int = 2
    rpo_alpha: float = 0.0
    rounds: int = 1

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"DPOConfig.loss_type={self.loss_type!r} is not one of "
                              f"{', '.join(map(repr, LOSS_TYPES))}.")
        if not self.beta > 0:
            raise ConfigError(f"DPOConfig.beta={self.beta} must be > 0.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"DPOConfig.label_smoothing={self.label_smoothing} must be in "
                              "[0, 0.5).")
        if self.rpo_alpha < 0:
            raise ConfigError(f"DPOConfig.rpo_alpha={self.rpo_alpha} must be >= 0.")
        if self.rounds < 1:
            raise ConfigError(f"DPOConfig.rounds={self.rounds} must be >= 1.")
        if self.heldout_pairs and not self.train_pairs:
            raise ConfigError("DPOConfig.heldout_pairs is set but DPOConfig.train_pairs is not; "
                              "set both, or neither (task pairs).")


# ------------------------------------------------------------------------------------ losses

def preference_loss(policy_chosen: jax.Array, policy_rejected: jax.Array,
                    ref_chosen: jax.Array, ref_rejected: jax.Array, *, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses, chosen rewards, rejected rewards), each [pairs], from sequence log-probabilities
    [pairs] of the chosen and rejected responses under the policy and the reference (for IPO,
    pass per-token averages)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}.")
    return (losses, beta * (policy_chosen - ref_chosen),
            beta * (policy_rejected - ref_rejected))


def token_logps(graphdef, params: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """log p(token t | tokens < t) [batch, seq] fp32 under the decoder, times mask [batch, seq]
    (the response tokens)."""
    logits = transformer.apply(graphdef, params, tokens)
    return token_logprobs(logits, tokens)[0] * mask


def dpo_loss_fn(graphdef, cfg: DPOConfig):
    """(params, batch) -> sums in the llm.train loss convention, for batches of
    `pairs.encode_pairs` rows plus `ref_chosen` / `ref_rejected` (the reference's masked
    per-token log-probabilities, `reference_logps`): nll = sum of pair losses, tokens = pairs,
    correct = pairs ranked right by the implicit reward (ties 1/2), and per-pair means
    (`per_token/...`) of the implicit rewards, their margin and the policy log-probabilities.
    Chosen and rejected rows go through the decoder as one [2 * pairs, seq] batch. With
    cfg.rpo_alpha > 0 each pair's loss also carries rpo_alpha x the chosen response's mean
    per-token negative log-likelihood (`per_token/chosen_nll` is logged either way)."""

    def loss_fn(params: dict, batch: dict) -> dict[str, jax.Array]:
        n = batch["chosen"].shape[0]
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        policy = jnp.sum(token_logps(graphdef, params, tokens, mask), axis=1)
        ref = jnp.concatenate([jnp.sum(batch["ref_chosen"], axis=1),
                               jnp.sum(batch["ref_rejected"], axis=1)])
        length = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        chosen_nll = -policy[:n] / length[:n]
        if cfg.loss_type == "ipo":
            policy, ref = policy / length, ref / length
        losses, r_c, r_r = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:],
                                           beta=cfg.beta, loss_type=cfg.loss_type,
                                           label_smoothing=cfg.label_smoothing)
        if cfg.rpo_alpha:
            losses = losses + cfg.rpo_alpha * chosen_nll
        w = (jnp.sum(batch["chosen_mask"], axis=1) > 0).astype(jnp.float32)  # 0: padding pair
        right = (r_c > r_r).astype(jnp.float32) + 0.5 * (r_c == r_r).astype(jnp.float32)
        return {"nll": jnp.sum(w * losses), "z_loss": jnp.zeros((), jnp.float32),
                "tokens": jnp.sum(w), "correct": jnp.sum(w * right),
                "per_token/chosen_reward": jnp.sum(w * r_c),
                "per_token/rejected_reward": jnp.sum(w * r_r),
                "per_token/reward_margin": jnp.sum(w * (r_c - r_r)),
                "per_token/chosen_logp": jnp.sum(w * policy[:n]),
                "per_token/rejected_logp": jnp.sum(w * policy[n:]),
                "per_token/chosen_nll": jnp.sum(w * chosen_nll)}

    return loss_fn


def reference_logps(graphdef, params: dict, rows: dict[str, np.ndarray], batch_size: int,
                    mesh, rules) -> dict[str, np.ndarray]:
    """`rows` plus ref_chosen / ref_rejected [n, seq] fp32: the frozen reference's masked
    per-token log-probabilities, by a jitted forward sharded like training (n a multiple of
    batch_size). Chosen and rejected rows go through as one [2 * batch, seq] batch, the shape
    `dpo_loss_fn` uses, so that a policy equal to the reference gets implicit rewards of exactly
    0 (XLA:CPU picks its kernels by shape)."""
    shard = batch_sharding(mesh, rules)

    def fn(params, batch):
        with activation_sharding(mesh, rules):
            tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
            mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
            logp = token_logps(graphdef, params, tokens, mask)
            n = batch["chosen"].shape[0]
            return logp[:n], logp[n:]

    fields = ("chosen", "rejected", "chosen_mask", "rejected_mask")
    jitted = jax.jit(fn, in_shardings=(jax.tree.map(lambda x: x.sharding, params),
                                       {k: shard for k in fields}),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    chosen, rejected = [], []
    for i in range(0, rows["chosen"].shape[0], batch_size):
        batch = to_global({k: rows[k][i:i + batch_size] for k in fields}, shard)
        c, r = jitted(params, batch)
        chosen.append(np.asarray(c))
        rejected.append(np.asarray(r))
    return {**rows, "ref_chosen": np.concatenate(chosen).astype(np.float32),
            "ref_rejected": np.concatenate(rejected).astype(np.float32)}


# ------------------------------------------------------------------------------ the training

def summarize(sums: dict[str, float]) -> dict:
    """Eval sums -> per-pair means: loss, implicit-reward accuracy (ties 1/2) with its 95%
    Wilson interval (`accuracy_lo`, `accuracy_hi`), rewards, margin."""
    pairs = max(sums["tokens"], 1.0)
    out = {"loss": sums["nll"] / pairs, "accuracy": sums["correct"] / pairs,
           "pairs": int(sums["tokens"])}
    out["accuracy_lo"], out["accuracy_hi"] = pairs_lib.wilson_interval(sums["correct"],
                                                                       sums["tokens"])
    out.update({k.removeprefix("per_token/"): v / pairs for k, v in sums.items()
                if k.startswith("per_token/")})
    return out


def _pairs(cfg: DPOConfig, ctx: RLHFContext) -> tuple[list, list, pairs_lib.TaskPairs | None]:
    """(train pairs, held-out pairs, the TaskPairs source of later rounds' and the final task
    reward's prompts, or None when the pairs come from files and there is one round)."""
    source = pairs_lib.TaskPairs()
    source = dataclasses.replace(source, prompt_format=source.resolved_format(ctx.base.manifest))
    if cfg.train_pairs:
        train = pairs_lib.read_pairs(cfg.train_pairs)
        if cfg.heldout_pairs:
            heldout = pairs_lib.read_pairs(cfg.heldout_pairs)
        else:
            train, heldout = pairs_lib.split_heldout(train, 0.1)
        return train, heldout, source if cfg.rounds > 1 else None
    pair_dir = os.path.join(ctx.run_dir, "pairs")
    stats = source.build(ctx.base.graphdef, ctx.base.params, ctx.base.cfg, ctx.base.tokenizer,
                         pair_dir)
    print(f"dpo: {stats['train']['pairs']} train / {stats['heldout']['pairs']} held-out pairs "
          f"from {source.samples} samples per prompt of the base on task {source.task!r} "
          f"(reward {source.reward_name!r}, mean sample reward "
          f"{stats['train']['mean_sample_reward']:.3f}), in {pair_dir}")
    return (pairs_lib.read_pairs(os.path.join(pair_dir, "train.jsonl")),
            pairs_lib.read_pairs(os.path.join(pair_dir, "heldout.jsonl")), source)


def _reference_rows(tokenizer, pairs: list, tc: TrainConfig, base, mesh, rules
                    ) -> tuple[dict[str, np.ndarray], int]:
    """Token rows of `pairs`, padded to a multiple of the batch, with the reference's per-token
    log-probabilities; and how many pairs were cut to fit."""
    rows, cut = pairs_lib.encode_pairs(tokenizer, pairs, tc.seq_len)
    rows = pairs_lib.pad_to_multiple(rows, tc.global_batch_size)
    fields = ("chosen", "rejected", "chosen_mask", "rejected_mask")
    return reference_logps(base.graphdef, base.params, {k: rows[k] for k in fields},
                           tc.global_batch_size, mesh, rules), cut


def _round_pairs(ctx: RLHFContext, source: pairs_lib.TaskPairs, round_index: int,
                 policy: dict | None) -> list:
    """Round `round_index` (>= 1) train pairs of iterative DPO, sampled from `policy` (None:
    they must already be on disk, written before the round's first checkpoint)."""
    out_dir = os.path.join(ctx.run_dir, "pairs", f"round{round_index}")
    path = os.path.join(out_dir, "train.jsonl")
    if policy is None and not os.path.isfile(path):
        raise ConfigError(f"dpo: the checkpoint is inside round {round_index} but {path} is "
                          "missing; restore the run directory's pairs/ or start a new run.")
    stats = source.build_round(ctx.base.graphdef, policy, ctx.base.cfg, ctx.base.tokenizer,
                               out_dir, round_index)
    print(f"dpo: round {round_index}: {stats['train']['pairs']} train pairs from "
          f"{source.samples} samples per prompt of the policy at temperature "
          f"{source.temperature} (mean sample reward {stats['train']['mean_sample_reward']:.3f})"
          f", in {out_dir}")
    return pairs_lib.read_pairs(path)


def train(ctx: RLHFContext) -> dict:
    """Train the policy with DPO/IPO from ctx.base (resuming from ctx.manager's latest
    checkpoint); returns the final record: held-out loss and implicit-reward accuracy before and
    after, and (task pairs) the mean held-out task reward of the policy and the reference.

    With DPOConfig.rounds = R > 1, round r trains steps [r S / R, (r + 1) S / R) on its own
    pairs (round 0: the base's; round r: sampled from the policy at step r S / R, written to
    <run_dir>/pairs/round<r>/ before the round starts); the held-out pairs stay the base's, the
    reference stays the base. A resumed run restores into the iterator of the round its
    checkpoint was written in, so it sees the same batches."""
    cfg, tc = DPOConfig(), TrainConfig()
    base = ctx.base
    base.cfg.check_seq_len(tc.seq_len)
    experiment.check_batch_fits_mesh(tc, ctx.mesh, ctx.rules)
    if tc.steps % cfg.rounds:
        raise ConfigError(f"TrainConfig.steps={tc.steps} is not a multiple of DPOConfig.rounds="
                          f"{cfg.rounds}; each round trains steps / rounds steps.")
    per_round = tc.steps // cfg.rounds
    train_pairs, heldout_pairs, source = _pairs(cfg, ctx)
    if len(train_pairs) < tc.global_batch_size:
        raise ConfigError(f"dpo: {len(train_pairs)} train pairs are fewer than "
                          f"TrainConfig.global_batch_size={tc.global_batch_size}; lower it or "
                          "add pairs.")
    held, held_cut = _reference_rows(base.tokenizer, heldout_pairs, tc, base, ctx.mesh,
                                     ctx.rules)
    _, abstract_params, logical_axes = transformer.abstract(base.cfg)

    def init(key):  # a copy: the step donates the state, and the base stays the reference
        del key
        return jax.tree.map(jnp.copy, base.params)
    init.loads_params = True
    model = experiment.ModelSpec(
        base.graphdef, abstract_params, logical_axes, init=init,
        loss_fn=dpo_loss_fn(base.graphdef, cfg), num_params=base.cfg.num_params(),
        flops_per_row=2 * base.cfg.flops_per_token(tc.seq_len) * tc.seq_len,
        base_run=base.run_dir, base_step=base.step)
    tx, schedule = make_optimizer(total_steps=tc.steps)
    plan = lora.make_plan(model.graphdef, model.abstract_params, model.logical_axes)
    if plan is None:
        state, shardings = create_train_state(model.init, abstract_params, logical_axes, tx,
                                              ctx.mesh, ctx.rules, seed=tc.seed)
        step_fn = jit_train_step(shardings, ctx.mesh, ctx.rules, loss_fn=model.loss_fn, tx=tx,
                                 schedule=schedule, accum_steps=tc.accum_steps)
        param_shardings, full_params = shardings.params, lambda s: s.params
    else:
        state, shardings, _, step_fn, param_shardings, full_params = experiment.lora_setup(
            plan, model, tc, tx, schedule, ctx.mesh, ctx.rules)
    eval_step = jit_eval_step(param_shardings, ctx.mesh, ctx.rules, model.loss_fn)
    shard = batch_sharding(ctx.mesh, ctx.rules)
    held_batches = [{k: v[i:i + tc.global_batch_size] for k, v in held.items()}
                    for i in range(0, held["chosen"].shape[0], tc.global_batch_size)]

    def evaluate(state, max_batches: int | None) -> dict:
        return summarize(accumulate(eval_step, full_params(state), held_batches,
                                    lambda b: to_global(b, shard), max_batches))

    # The round whose data iterator the latest checkpoint holds (a checkpoint at a round's end
    # holds that round's iterator; the next round then starts a fresh one).
    steps_saved = ctx.manager.all_steps()
    round_index = (max(steps_saved) - 1) // per_round if steps_saved else 0
    round_index = min(max(round_index, 0), cfg.rounds - 1)
    if round_index > 0:
        train_pairs = _round_pairs(ctx, source, round_index, None)
    rows, cut = _reference_rows(base.tokenizer, train_pairs, tc, base, ctx.mesh, ctx.rules)
    print(f"dpo: {cfg.loss_type} loss, beta {cfg.beta}, rpo_alpha {cfg.rpo_alpha}, "
          f"{cfg.rounds} round(s) of {per_round} steps; {len(train_pairs)} train / "
          f"{len(heldout_pairs)} held-out pairs ({cut + held_cut} cut to {tc.seq_len} tokens); "
          "reference log-probs precomputed")
    data_iter = iter(pairs_lib.pair_dataset(rows, tc.global_batch_size, tc.seed + round_index))

    initial = evaluate(state, None)  # the policy is the reference: accuracy 0.5, loss log 2
    restored = checkpoint.restore_latest(ctx.manager, state, data_iter)
    if restored is not None:
        state = restored
        print(f"dpo: resumed from step {int(state.step)} of {tc.steps}")
        if not round_index * per_round < int(state.step) <= (round_index + 1) * per_round:
            raise ConfigError(f"dpo: restored step {int(state.step)} is not in round "
                              f"{round_index} (steps {round_index * per_round + 1}.."
                              f"{(round_index + 1) * per_round}); a newer checkpoint was "
                              "unreadable. Move the checkpoints away to start again.")
    round_pairs = [len(train_pairs)]
    peak, _ = peak_flops()
    while True:
        state, status = train_loop(
            cfg=dataclasses.replace(tc, steps=(round_index + 1) * per_round), state=state,
            step_fn=step_fn, data_iter=data_iter, batch_sharding=shard, manager=ctx.manager,
            writer=ctx.writer, flops_per_step=model.flops_per_row * tc.global_batch_size,
            peak_flops_total=peak * jax.device_count(), evaluate=evaluate)
        if status == "preempted":
            print(f"dpo: stopped by signal at step {int(state.step)}; checkpoint written.")
            return {"status": status, "step": int(state.step)}
        round_index += 1
        if round_index == cfg.rounds:
            break
        ctx.writer.write(int(state.step), evaluate(state, None), prefix="eval")
        train_pairs = _round_pairs(ctx, source, round_index, full_params(state))
        round_pairs.append(len(train_pairs))
        rows, _ = _reference_rows(base.tokenizer, train_pairs, tc, base, ctx.mesh, ctx.rules)
        data_iter = iter(pairs_lib.pair_dataset(rows, tc.global_batch_size,
                                                tc.seed + round_index))
    final = evaluate(state, None)
    ctx.writer.write(int(state.step), final, prefix="eval")
    result = {"step": int(state.step), "algorithm": "dpo", "loss_type": cfg.loss_type,
              "beta": cfg.beta, "rpo_alpha": cfg.rpo_alpha, "rounds": cfg.rounds,
              "heldout": final, "heldout_initial": initial,
              "train_pairs": len(train_pairs), "round_train_pairs": round_pairs,
              "heldout_pairs": len(heldout_pairs)}
    print(f"dpo: held-out implicit-reward accuracy {initial['accuracy']:.3f} -> "
          f"{final['accuracy']:.3f} (95% CI {final['accuracy_lo']:.3f}-"
          f"{final['accuracy_hi']:.3f}), loss {initial['loss']:.4f} -> {final['loss']:.4f} "
          f"({final['pairs']} pairs)")
    if source is not None and cfg.eval_samples > 0:
        result.update(task_reward(ctx, source, full_params(state), cfg.eval_samples))
    return result


def task_reward(ctx: RLHFContext, source: pairs_lib.TaskPairs, policy: dict, samples: int
                ) -> dict:
    """Mean task reward on the held-out prompts of the policy and of the reference (the base):
    `samples` completions each with the same key and settings as the pairs (reward_policy,
    reward_reference), and one greedy completion each (reward_greedy_policy / _reference). The
    gains are paired by prompt (`*_gain_stderr`: the standard error of the per-prompt
    differences; `*_better` / `*_worse`: prompts where the policy scores higher / lower)."""
    examples = source.examples("heldout")
    out = {"task": source.task, "reward": source.reward_name, "eval_prompts": len(examples)}
    for prefix, temperature, n in (("reward", source.temperature, samples),
                                   ("reward_greedy", 0.0, 1)):
        per_prompt = {}
        for name, params in (("policy", policy), ("reference", ctx.base.params)):
            score = pairs_lib.mean_task_reward(
                ctx.base.graphdef, params, ctx.base.cfg, ctx.base.tokenizer, examples,
                source.reward_name, samples=n, max_new_tokens=source.max_new_tokens,
                temperature=temperature, top_p=source.top_p, seed=10_000 + source.seed,
                batch_size=source.batch_size, max_prompt_len=source.max_prompt_len,
                prompt_format=source.prompt_format)
            out[f"{prefix}_{name}"] = score["mean_reward"]
            out[f"{prefix}_{name}_stderr"] = score["stderr"]
            per_prompt[name] = score["per_prompt"]
        d = per_prompt["policy"] - per_prompt["reference"]
        out[f"{prefix}_gain"] = float(d.mean())
        out[f"{prefix}_gain_stderr"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 \
            else 0.0
        out[f"{prefix}_better"], out[f"{prefix}_worse"] = int((d > 0).sum()), int((d < 0).sum())
    out["reward_temperature"], out["reward_samples"] = source.temperature, samples
    print(f"dpo: held-out mean task reward {out['reward_policy']:.4f} (reference "
          f"{out['reward_reference']:.4f}, paired gain {out['reward_gain']:+.4f} +- "
          f"{out['reward_gain_stderr']:.4f}) over {len(examples)} prompts x {samples} samples "
          f"at temperature {source.temperature}; greedy {out['reward_greedy_policy']:.4f} "
          f"(reference {out['reward_greedy_reference']:.4f}, gain "
          f"{out['reward_greedy_gain']:+.4f} +- {out['reward_greedy_gain_stderr']:.4f})")
    return out
