"""The on-policy loop PPO and GRPO share: prompts -> rollouts -> rewards -> update epochs.

One RL step, top to bottom (`train`):

1. draw `prompts_per_step` training prompts of the task (a checkpointed, seeded `PromptOrder`),
   each repeated `samples_per_prompt` times (GRPO's group);
2. sample responses with the jitted KV-cache sampler (`llm.posttrain.rollout`) from the current
   policy, with the run's temperature / top-p;
3. score the decoded completions with the task's Python reward (`llm.posttrain.tasks.score`; a
   function that raises or returns NaN is a one-line error naming it and the sample);
4. `prepare` (jitted, no gradient): the old policy's and the reference's per-token log-probs,
   the policy entropy, and the algorithm's advantages (PPO: values + GAE; GRPO: group-relative);
5. `epochs` passes over the rollout batch in `minibatches` shuffled minibatches, each one
   optimizer update of the algorithm's loss (jitted, state donated);
6. metrics (reward, kl, entropy, response length, losses) to metrics.jsonl and TensorBoard; an
   orbax checkpoint of the `RLState` (trainable params, optimizer state, step, RNG, KL
   coefficient) and of the prompt position every `checkpoint_manager.save_every` steps.

Everything random comes from the RNG in the state and the prompt order from the seed, so a
resumed run repeats the uninterrupted one bit for bit. The policy, reference and value models
are sharded by the logical-axis rules of pretraining. With `LoraConfig.enabled=True` the trainable
policy params are LoRA adapters (`llm.train.lora`), the policy is `lora.combine(...)` of them and
the frozen base, and the reference is the base itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from llm.config import ConfigError
from llm.data.objectives import EOS_ID
from llm.data.sources import DataError
from llm.model import transformer
from llm.parallel.rules import activation_sharding, named_sharding, tree_shardings
from llm.posttrain import tasks
from llm.posttrain.context import RLHFContext, token_logprobs
from llm.posttrain.kl import KL_ESTIMATORS, adaptive_kl_coef, kl_coef_in_force
from llm.posttrain.rollout import Rollout, rollout
from llm.train import checkpoint
from llm.train.optimizer import make_optimizer
from llm.train.step import batch_sharding

PROMPT_FORMATS = ("auto", "raw", "chat")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Settings of an on-policy RL run (gin: RLConfig.*).

    task / reward: the task family of `llm.posttrain.tasks` whose train split gives the prompts,
      and the reward (a registered name or "package.module:function"; None: the task's default).
    prompt_format: "raw" (the task's text), "chat" (a user turn of the chat template, completion
      cut at the next role tag), "auto" (chat when the base run is an SFT run).
    num_prompts: training prompts drawn from the task's train split (None: all of it).
    eval_prompts: held-out prompts scored at the end (the policy and the reference, same key).
    steps: RL steps (one rollout batch each). prompts_per_step x samples_per_prompt sequences per
      batch; GRPO normalises rewards within each prompt's group of samples_per_prompt.
    max_prompt_len / max_new_tokens: fixed row layout (longer prompts keep their last tokens).
    temperature / top_p: sampling (the loss scores softmax(logits / temperature)).
    epochs / minibatches: update passes over each rollout batch, and minibatches per pass.
    clip_eps: the ratio clip of the surrogate objective. kl_coef: the KL penalty's coefficient
      (the initial one when adaptive). kl_estimator: "k1" | "k2" | "k3" (`llm.posttrain.kl`).
    target_kl / kl_horizon / kl_coef_min: None keeps kl_coef fixed; a number adapts it every step
      towards that mean sequence KL (k1, nats) with Ziegler et al.'s controller
      (`llm.posttrain.kl.adaptive_kl_coef`): at most a factor 1 +- 0.2 * batch / kl_horizon a
      step, never below kl_coef_min. The controller reads the KL of the step's own rollouts
      (measured by `prepare`) before that step's update, so GRPO's loss pays the new coefficient
      at once; PPO's penalty is in the rewards `prepare` already shaped, so there it shapes the
      next batch (Ziegler et al.'s order).
    kl_gain: a proportional term on top (`llm.posttrain.kl.kl_coef_in_force`): the step's update
      uses the controller's state x exp(kl_gain x clip(KL / target - 1, -1, 1)); 0 = Ziegler's
      controller alone. GRPO only (PPO shapes its rewards before the batch's KL is known).
    eval_rewards: more rewards (names as `reward`, e.g. the programmatic task reward beside a
      reward model) scored on the same held-out completions; eval.json gets
      reward_<name>_{policy,reference,gain} (`reward_key`: "rm" for a reward model).
    sample_log_every: every N steps, append each sampled (prompt, completion, reward) of the step
      to <run_dir>/samples.jsonl (0: never).
    fault_injection: testing hook, "sigkill_after_save:N" kills the process with SIGKILL right
      after the checkpoint of step N is committed.
    """

    task: str = "addition"
    reward: str | None = None
    prompt_format: str = "auto"
    num_prompts: int | None = None
    eval_prompts: int = 64
    steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_prompt_len: int = 64
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    epochs: int = 1
    minibatches: int = 1
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    kl_estimator: str = "k3"
    target_kl: float | None = None
    kl_horizon: int = 10_000
    kl_coef_min: float = 0.0
    kl_gain: float = 0.0
    eval_rewards: tuple[str, ...] = ()
    sample_log_every: int = 0
    fault_injection: str | None = None

    def __post_init__(self):
        for field in ("steps", "prompts_per_step", "samples_per_prompt", "max_prompt_len",
                      "max_new_tokens", "epochs", "minibatches", "eval_prompts"):
            if getattr(self, field) < 1:
                raise ConfigError(f"RLConfig.{field}={getattr(self, field)} must be >= 1.")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"RLConfig.prompt_format={self.prompt_format!r} is not one of "
                              f"{', '.join(map(repr, PROMPT_FORMATS))}.")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"RLConfig.kl_estimator={self.kl_estimator!r} is not one of "
                              f"{', '.join(map(repr, KL_ESTIMATORS))}.")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.clip_eps > 0
                and self.kl_coef >= 0):
            raise ConfigError(f"RLConfig needs temperature > 0 (got {self.temperature}), 0 < "
                              f"top_p <= 1 (got {self.top_p}), clip_eps > 0 (got "
                              f"{self.clip_eps}) and kl_coef >= 0 (got {self.kl_coef}).")
        if self.target_kl is not None and not (self.target_kl > 0 and self.kl_horizon >= 1):
            raise ConfigError(f"RLConfig.target_kl={self.target_kl} must be > 0 (or None for a "
                              f"fixed kl_coef) and RLConfig.kl_horizon={self.kl_horizon} >= 1.")
        if self.kl_gain < 0:
            raise ConfigError(f"RLConfig.kl_gain={self.kl_gain} must be >= 0.")
        if not 0 <= self.kl_coef_min <= self.kl_coef:
            raise ConfigError(f"RLConfig.kl_coef_min={self.kl_coef_min} must be between 0 and "
                              f"RLConfig.kl_coef={self.kl_coef} (the floor of the adaptive "
                              "coefficient).")
        if self.sample_log_every < 0:
            raise ConfigError(f"RLConfig.sample_log_every={self.sample_log_every} must be >= 0.")
        if self.batch_size % self.minibatches:
            raise ConfigError(f"RLConfig.prompts_per_step x samples_per_prompt = "
                              f"{self.batch_size} rows do not split into RLConfig.minibatches="
                              f"{self.minibatches}; use a divisor of {self.batch_size}.")
        if self.fault_injection is not None:
            kind, _, at = self.fault_injection.partition(":")
            if kind != "sigkill_after_save" or not at.isdigit():
                raise ConfigError(f"RLConfig.fault_injection={self.fault_injection!r} is not "
                                  "'sigkill_after_save:N'.")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@flax.struct.dataclass
class RLState:
    """step: int32, RL steps done. params: the trainable policy (the full decoder params, or
    LoRA adapters) -- `state.params` as in pretraining, so `llm.runs.load_run` opens an RL run.
    value: the value model's params (PPO; {} without a critic). opt_state: optax state of
    {"policy": params, "value": value}. rng: uint32 [2] key data, split once per step.
    kl_coef: fp32, the KL penalty coefficient: the adaptive controller's state between steps (its
    checkpointed value), the coefficient in force while a step updates (`kl_controller`)."""

    step: jax.Array
    params: dict
    value: dict
    opt_state: optax.OptState
    rng: jax.Array
    kl_coef: jax.Array


Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What PPO and GRPO plug into the loop.

    name: "ppo" / "grpo".
    init_value: (ctx, key) -> (value params, their logical axes), or None (no critic).
    prepare: (policy_params, ref_params, value_params ({} without a critic), batch, kl_coef) ->
      dict of new batch fields (at least old_logp, ref_logp, advantages [batch, seq]; kl,
      kl_k3, entropy [batch] per-sequence figures for metrics). batch has tokens,
      response_mask [batch, seq] and scores [batch].
    loss: (policy_params, value_params, minibatch, kl_coef) -> (scalar loss, metrics).
    next_kl_coef: host-side (controller state, mean sequence KL of the batch just sampled) ->
      (the next controller state, the coefficient this step's update applies).
    """

    name: str
    init_value: Callable | None
    prepare: Callable
    loss: Callable
    next_kl_coef: Callable[[float, float], tuple[float, float]] = lambda coef, kl: (coef, coef)


def to_host(tree):
    """device_get that also works on more than one process: arrays that span other processes'
    devices (split along the batch) are all-gathered first, so every process gets the global
    values."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(get, tree)


def kl_controller(rc: RLConfig) -> Callable[[float, float], tuple[float, float]]:
    """Algorithm.next_kl_coef for RLConfig's target_kl / kl_horizon / kl_coef_min / kl_gain
    (the coefficient unchanged without a target). Returns (state, coefficient in force), both
    rounded to float32 as the state stores them."""
    def step(coef: float, kl: float) -> tuple[float, float]:
        state = float(np.float32(adaptive_kl_coef(coef, kl, rc.target_kl, rc.kl_horizon,
                                                  rc.batch_size, rc.kl_coef_min)))
        return state, float(np.float32(kl_coef_in_force(state, kl, rc.target_kl, rc.kl_gain,
                                                        rc.kl_coef_min)))
    return step


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1) over `axis` (all axes by default)."""
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def policy_logprobs(graphdef, params: dict, tokens: jax.Array, temperature: float
                    ) -> tuple[jax.Array, jax.Array]:
    """(log-prob of each token given its prefix, entropy of that distribution), [batch, seq]."""
    return token_logprobs(transformer.apply(graphdef, params, tokens), tokens, temperature)


# ------------------------------------------------------------------------------- prompt order


class PromptOrder:
    """An endless, seeded order over prompt indices: epoch e visits a permutation drawn from
    (seed, e). Its position (epoch, index) is checkpointed beside the state (grain's checkpoint
    handler calls get_state / set_state), so a resumed run draws the same prompts."""

    def __init__(self, num: int, batch: int, seed: int):
        self.num, self.batch, self.seed = num, batch, seed
        self.epoch = self.index = 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num)

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        out = []
        while len(out) < self.batch:
            order = self._order()
            take = min(self.batch - len(out), self.num - self.index)
            out.extend(int(i) for i in order[self.index:self.index + take])
            self.index += take
            if self.index == self.num:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def get_state(self) -> bytes:
        return json.dumps({"epoch": self.epoch, "index": self.index, "num": self.num,
                           "seed": self.seed}).encode()

    def set_state(self, state: bytes | str) -> None:
        s = json.loads(state)
        self.epoch, self.index = s["epoch"], s["index"]
        self.restored_from = (s["num"], s["seed"])

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after set_state; there is nothing to prefetch."""

    def check_restored(self) -> None:
        """ConfigError if the restored position belongs to another prompt set or seed."""
        num, seed = getattr(self, "restored_from", (self.num, self.seed))
        if (num, seed) != (self.num, self.seed):
            raise ConfigError(
                f"the checkpoint's prompt order is over {num} prompts with seed {seed}, this "
                f"run's over {self.num} with seed {self.seed}; restore RLConfig.task / "
                "num_prompts and rlhf.seed, or use a new rlhf.run_dir.")


# ----------------------------------------------------------------------------------- prompts


def is_chat_run(manifest: dict) -> bool:
    """Whether a run's policy was tuned on the chat template: an SFT run, or an RLHF run from
    one (`experiments.rlhf` records "chat_template" in its manifest)."""
    return manifest.get("objective") == "sft" or bool(manifest.get("chat_template"))


def chat_format(ctx: RLHFContext, rc: RLConfig) -> bool:
    if rc.prompt_format == "auto":
        return is_chat_run(ctx.base.manifest)
    return rc.prompt_format == "chat"


def prompt_texts(texts: list[str], chat: bool) -> list[str]:
    """The prompt text as the policy reads it: the task's text, or its chat-template user turn
    followed by the assistant tag."""
    from llm.serve.chat_template import render_chat

    return [render_chat([{"role": "user", "content": t}]) for t in texts] if chat else texts


def encode_prompts(ctx: RLHFContext, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt as the base model reads a document: BOS (= PAD_ID, the
    pretraining convention of `llm.data.objectives`) then the text, or the chat template's user
    turn and the assistant tag."""
    from llm.data.objectives import PAD_ID

    return [[PAD_ID, *ids] for ids in ctx.base.tokenizer.encode_batch(prompt_texts(texts, chat))]


def decode_completions(ctx: RLHFContext, responses: list[list[int]], chat: bool) -> list[str]:
    """The text each response continues the prompt with (chat: cut at the next role tag)."""
    from llm.serve.chat_template import CHAT_STOP

    out = []
    for ids in responses:
        text = ctx.base.tokenizer.decode(ids)
        if chat:
            cut = [text.index(s) for s in CHAT_STOP if s in text]
            text = text[:min(cut)] if cut else text
        out.append(text)
    return out


# ----------------------------------------------------------------------------------- rewards

Scorer = Callable[[list[str], list[str], list[str]], np.ndarray]


def reward_key(spec: str) -> str:
    """The short name of a reward spec in eval.json keys: "rm" for a reward model, else the
    registered name or the function's name of "package.module:function"."""
    return "rm" if spec.startswith("rm:") else spec.rsplit(":", 1)[-1]


def make_scorer(ctx: RLHFContext, spec: str) -> Scorer:
    """(prompts, completions, references) -> rewards [n] float32, from RLConfig.reward:

    "rm:<run dir>": a reward model trained by `experiments.reward` (`reward_model.load`),
      scoring the prompt text the policy was given and its completion (references unused);
    anything else: a Python reward fn(prompt, completion, reference) -> float named in the
      tasks registry or "package.module:function" (`tasks.score`: a function that raises or
      returns NaN/inf is a one-line RewardError naming it and the sample).
    """
    if spec.startswith("rm:"):
        from llm.posttrain import reward_model

        try:
            rm = reward_model.load(spec[3:], mesh=ctx.mesh, rules=ctx.rules)
        except DataError as e:
            raise DataError(f"RLConfig.reward={spec!r}: {e}") from None

        def score_rm(prompts, completions, references):
            del references
            out = np.asarray(rm.score(list(prompts), list(completions)), np.float32)
            if not np.all(np.isfinite(out)):
                i = int(np.flatnonzero(~np.isfinite(out))[0])
                raise tasks.RewardError(
                    f"reward model {spec[3:]!r} returned {out[i]} on the sample "
                    f"prompt={prompts[i][:80]!r} completion={completions[i][:80]!r}")
            return out
        return score_rm
    fn = tasks.get_reward(spec)
    return lambda prompts, completions, references: tasks.score(fn, prompts, completions,
                                                                references)


# -------------------------------------------------------------------------------- the steps


def init_opt_state(tx: optax.GradientTransformation, params: dict, mesh) -> optax.OptState:
    """Optimizer state in the sharding XLA propagates from the params (as `create_train_state`);
    scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled = jax.jit(tx.init).lower(params).compile()
    shardings = jax.tree.map(
        lambda s: s if len(s.device_set) == mesh.size else replicated, compiled.output_shardings)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def batch_shardings(batch: dict, mesh, rules) -> dict:
    """[batch, seq] fields split like pretraining batches; [batch] fields along the batch."""
    rows = named_sharding(("activation_batch",), mesh, rules)
    return {k: batch_sharding(mesh, rules) if np.ndim(v) == 2 else rows for k, v in batch.items()}


@dataclasses.dataclass
class Steps:
    """The jitted pieces of one RL step for a fixed algorithm, model and mesh.

    params_of(trainable policy, frozen) -> (policy params, reference params).
    prepare(state, frozen, batch) -> batch with the algorithm's fields added.
    update(state, frozen, batch, idx) -> (state, metrics): one optimizer step on rows `idx`.
    """

    params_of: Callable
    prepare: Callable
    update: Callable


def make_steps(algo: Algorithm, tx: optax.GradientTransformation, state_shardings: RLState,
               frozen_shardings: dict, batch_example: dict, mesh, rules,
               params_of: Callable) -> Steps:
    """Jit `prepare` and `update` with explicit shardings (state donated by `update`)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    in_batch = batch_shardings(batch_example, mesh, rules)

    def prepare(state: RLState, frozen: dict, batch: Batch) -> Batch:
        with activation_sharding(mesh, rules):
            policy, ref = params_of(state.params, frozen)
            return {**batch, **algo.prepare(policy, ref, state.value, batch, state.kl_coef)}

    def update(state: RLState, frozen: dict, batch: Batch, idx: jax.Array):
        with activation_sharding(mesh, rules):
            minibatch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch)

            def objective(trainable):
                policy, _ = params_of(trainable["policy"], frozen)
                return algo.loss(policy, trainable["value"], minibatch, state.kl_coef)

            trainable = {"policy": state.params, "value": state.value}
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
            updates, opt_state = tx.update(grads, state.opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        return state.replace(params=trainable["policy"], value=trainable["value"],
                             opt_state=opt_state), metrics

    prepared = jax.jit(prepare, in_shardings=(state_shardings, frozen_shardings, in_batch))
    updated = jax.jit(update, in_shardings=(state_shardings, frozen_shardings, None, replicated),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    return Steps(params_of=params_of, prepare=prepared, update=updated)


def update_epochs(steps: Steps, state: RLState, frozen: dict, batch: Batch, key: jax.Array,
                  rc: RLConfig) -> tuple[RLState, dict[str, float]]:
    """rc.epochs passes over the batch in rc.minibatches shuffled minibatches. Returns the state
    and the update metrics averaged over all minibatch steps."""
    rows = rc.batch_size
    size = rows // rc.minibatches
    collected = []
    for epoch_key in jax.random.split(key, rc.epochs):
        order = np.asarray(jax.random.permutation(epoch_key, rows))
        for m in range(rc.minibatches):
            state, metrics = steps.update(state, frozen, batch,
                                          jnp.asarray(order[m * size:(m + 1) * size]))
            collected.append(metrics)
    collected = to_host(collected)
    return state, {k: float(np.mean([c[k] for c in collected])) for k in collected[0]}


# ---------------------------------------------------------------------------------- the loop


def lora_plan(ctx: RLHFContext):
    """The LoRA plan of gin's LoraConfig for the base model (None when LoRA is off)."""
    from llm.train import lora

    _, abstract_params, logical_axes = transformer.abstract(ctx.base.cfg)
    return lora.make_plan(ctx.base.graphdef, abstract_params, logical_axes)


def init_state(ctx: RLHFContext, algo: Algorithm, rc: RLConfig, tx, seed: int
               ) -> tuple[RLState, dict, Callable]:
    """(initial state, frozen params, params_of). Full fine-tuning: the trainable policy is a
    copy of the base params, frozen = {"reference": base params}. LoRA: the trainable policy is
    the adapters, frozen = {"base": lora.freeze(base)}, the reference is the base itself."""
    mesh, rules = ctx.mesh, ctx.rules
    replicated = NamedSharding(mesh, PartitionSpec())
    policy_key, value_key, rng = jax.random.split(jax.random.key(seed), 3)
    plan = lora_plan(ctx)
    if plan is None:
        policy = jax.tree.map(jnp.copy, ctx.base.params)
        frozen = {"reference": ctx.base.params}

        def params_of(policy, frozen):
            return policy, frozen["reference"]
    else:
        from llm.train import lora

        _, abstract_params, logical_axes = transformer.abstract(ctx.base.cfg)
        adapters = lora.init_adapters(plan, policy_key, ctx.base.params)
        adapters = jax.device_put(jax.tree.map(np.asarray, adapters), tree_shardings(
            lora.adapter_axes(plan, logical_axes), lora.abstract_adapters(plan, abstract_params),
            mesh, rules))
        policy = adapters
        frozen = {"base": lora.freeze(plan, ctx.base.params)}

        def params_of(policy, frozen):
            return (lora.combine(plan, policy, frozen["base"]),
                    lora.base_params(plan, frozen["base"]))
    value = {}
    if algo.init_value is not None:
        value, value_axes = algo.init_value(ctx, value_key)
        value = jax.device_put(value, tree_shardings(value_axes, value, mesh, rules))
    # Host values (numpy), not single-device arrays, go to device_put: on more than one
    # process a global array is only well formed when every process passes the whole value.
    trainable = {"policy": policy, "value": value}
    state = RLState(step=jax.device_put(np.int32(0), replicated),
                    params=policy, value=value, opt_state=init_opt_state(tx, trainable, mesh),
                    rng=jax.device_put(np.asarray(jax.random.key_data(rng)), replicated),
                    kl_coef=jax.device_put(np.float32(rc.kl_coef), replicated))
    return state, frozen, params_of


def _fault(rc: RLConfig, step: int, manager) -> None:
    if rc.fault_injection and int(rc.fault_injection.partition(":")[2]) == step:
        manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)


def sample_batch(ctx: RLHFContext, rc: RLConfig, policy: dict, prompts: list[list[int]],
                 key: jax.Array) -> Rollout:
    return rollout(ctx.base.graphdef, policy, ctx.base.cfg, prompts,
                   max_prompt_len=rc.max_prompt_len, max_new_tokens=rc.max_new_tokens, rng=key,
                   temperature=rc.temperature, top_p=rc.top_p, eos_id=EOS_ID)


def train(ctx: RLHFContext, algo: Algorithm) -> dict:
    """Run `algo` for RLConfig.steps RL steps from the base run (resuming from the run's latest
    checkpoint), then score the policy and the reference on held-out prompts. Returns the final
    record (eval.json)."""
    rc = RLConfig()
    reward = rc.reward or tasks.default_reward(rc.task)
    scorer = make_scorer(ctx, reward)
    extra_scorers = {name: make_scorer(ctx, name) for name in rc.eval_rewards}
    train_ex = tasks.make_examples(rc.task, "train", rc.num_prompts, seed=ctx.seed)
    eval_ex = tasks.make_examples(rc.task, "heldout", rc.eval_prompts, seed=ctx.seed)
    if not train_ex:
        raise ConfigError(f"task {rc.task!r} has no training prompts; check its gin settings.")
    chat = chat_format(ctx, rc)
    # The text a reward sees as the prompt: the task's own (Python rewards parse it), or for a
    # reward model the text the policy was given.
    def texts_for(spec: str, examples: list) -> list[str]:
        return prompt_texts([e.prompt for e in examples], chat and spec.startswith("rm:"))

    train_texts = texts_for(reward, train_ex)
    eval_scorers = {"": (scorer, texts_for(reward, eval_ex))}
    eval_scorers.update({reward_key(name): (fn, texts_for(name, eval_ex))
                         for name, fn in extra_scorers.items()})
    train_ids = encode_prompts(ctx, [e.prompt for e in train_ex], chat)
    eval_ids = encode_prompts(ctx, [e.prompt for e in eval_ex], chat)

    updates_total = rc.steps * rc.epochs * rc.minibatches
    tx, schedule = make_optimizer(total_steps=updates_total)
    state, frozen, params_of = init_state(ctx, algo, rc, tx, ctx.seed)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    example = {"tokens": np.zeros((rc.batch_size, rc.max_prompt_len + rc.max_new_tokens),
                                  np.int32),
               "response_mask": np.zeros((rc.batch_size, rc.max_prompt_len + rc.max_new_tokens),
                                         np.float32),
               "scores": np.zeros((rc.batch_size,), np.float32)}
    steps = make_steps(algo, tx, state_shardings, frozen_shardings, example, ctx.mesh, ctx.rules,
                       params_of)
    shardings = batch_shardings(example, ctx.mesh, ctx.rules)
    order = PromptOrder(len(train_ex), rc.prompts_per_step, ctx.seed)
    restored = checkpoint.restore_latest(ctx.manager, state, order)
    if restored is not None:
        order.check_restored()
        state = restored
        print(f"rlhf: resumed from step {int(state.step)} of {rc.steps}")
    start = int(state.step)
    print(f"rlhf: {algo.name} on task {rc.task!r} ({len(train_ex)} train / {len(eval_ex)} "
          f"held-out prompts, reward {reward!r}, {'chat' if chat else 'raw'} prompts), "
          f"{rc.batch_size} samples per step")
    bar = tqdm(total=rc.steps, initial=start, desc=algo.name, unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    try:
        for step in range(start, rc.steps):
            t0 = time.perf_counter()
            rng, rollout_key, update_key = jax.random.split(jax.random.wrap_key_data(state.rng), 3)
            chosen = [i for i in next(order) for _ in range(rc.samples_per_prompt)]
            policy, _ = params_of(state.params, frozen)
            ro = sample_batch(ctx, rc, policy, [train_ids[i] for i in chosen], rollout_key)
            t_rollout = time.perf_counter() - t0
            completions = decode_completions(ctx, ro.responses, chat)
            scores = scorer([train_texts[i] for i in chosen], completions,
                            [train_ex[i].reference for i in chosen])
            host = {"tokens": ro.tokens, "response_mask": ro.response_mask, "scores": scores}
            batch = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
            batch = steps.prepare(state, frozen, batch)
            prepared = to_host({k: batch[k] for k in ("kl", "kl_k3", "entropy")})
            # The KL controller reacts to this step's rollouts before this step's update.
            seq_kl = float(np.mean(prepared["kl"]))
            # state.kl_coef carries the controller's state between steps and the coefficient in
            # force (state x the proportional term) during this step's update.
            kl_state, kl_coef = algo.next_kl_coef(float(state.kl_coef), seq_kl)
            state = state.replace(kl_coef=jax.device_put(np.float32(kl_coef),
                                                         state_shardings.kl_coef))
            state, metrics = update_epochs(steps, state, frozen, batch, update_key, rc)
            state = jax.device_put(  # the same placement every step: no recompilation
                state.replace(step=state.step + 1, rng=jax.random.key_data(rng),
                              kl_coef=np.float32(kl_state)), state_shardings)
            lengths = ro.response_lengths
            dt = time.perf_counter() - t0
            record = {
                "reward": float(scores.mean()), "reward_std": float(scores.std()),
                "kl": seq_kl, "kl_k3": float(np.mean(prepared["kl_k3"])),
                "entropy": float(np.sum(prepared["entropy"] * lengths) / max(lengths.sum(), 1)),
                "response_length": float(lengths.mean()), "kl_coef": kl_coef,
                "kl_coef_state": kl_state,
                "learning_rate": float(schedule((step + 1) * rc.epochs * rc.minibatches - 1)),
                **metrics, "rollout_s": t_rollout, "step_time_s": dt,
                "rollout_tokens_per_s": float(lengths.sum()) / t_rollout,
                "prompts_truncated": ro.truncated,
            }
            if not all(math.isfinite(v) for v in record.values()):
                bad = [k for k, v in record.items() if not math.isfinite(v)]
                raise FloatingPointError(f"rlhf: {', '.join(bad)} became non-finite at step "
                                         f"{step + 1}; lower learning_rate_schedule.peak.")
            ctx.writer.write(step + 1, record)
            if rc.sample_log_every and (step + 1) % rc.sample_log_every == 0:
                log_samples(ctx.run_dir, step + 1, [train_texts[i] for i in chosen],
                            completions, scores)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{seq_kl:.3f}")
            if checkpoint.save(ctx.manager, step + 1, state, order):
                _fault(rc, step + 1, ctx.manager)
    finally:
        bar.close()  # ends the bar's line before any error message
    ctx.manager.wait_until_finished()
    if int(state.step) > start and int(state.step) not in ctx.manager.all_steps():
        checkpoint.save(ctx.manager, int(state.step), state, order, force=True)
        ctx.manager.wait_until_finished()
    return evaluate(ctx, rc, algo, state, frozen, params_of, eval_ex, eval_ids, eval_scorers,
                    chat)


def log_samples(run_dir: str, step: int, prompts: list[str], completions: list[str],
                rewards: np.ndarray) -> None:
    """Append one JSON line per sample of `step` to <run_dir>/samples.jsonl (process 0)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(run_dir, "samples.jsonl"), "a") as f:
        for p, c, r in zip(prompts, completions, np.asarray(rewards).tolist()):
            f.write(json.dumps({"step": step, "prompt": p, "completion": c, "reward": r}) + "\n")


def evaluate(ctx: RLHFContext, rc: RLConfig, algo: Algorithm, state: RLState, frozen: dict,
             params_of: Callable, examples: list, prompt_ids: list[list[int]],
             scorers: dict[str, tuple[Scorer, list[str]]], chat: bool) -> dict:
    """Mean held-out reward of the policy and of the reference, each sampling the held-out
    prompts with the same key and settings, plus the policy's mean sequence KL to the reference
    (k1 and k3) on its own samples. `scorers`: {"": (the training reward, its prompt texts),
    name: (an RLConfig.eval_rewards reward, its prompt texts)}; each scores the same completions
    (eval.json: reward_{policy,reference} and reward_<name>_{policy,reference})."""
    policy, ref = params_of(state.params, frozen)
    key = jax.random.key(10_000 + ctx.seed)
    out = {"step": int(state.step), "algorithm": algo.name, "task": rc.task,
           "eval_prompts": len(examples)}
    ref_logp_fn = jax.jit(lambda p, t: policy_logprobs(ctx.base.graphdef, p, t,
                                                       rc.temperature)[0])
    for name, params in (("policy", policy), ("reference", ref)):
        rewards, kls, k3s = {k: [] for k in scorers}, [], []
        for i in range(0, len(examples), rc.batch_size):
            chunk = list(range(i, min(i + rc.batch_size, len(examples))))
            ids = [prompt_ids[j] for j in chunk]
            ids += [ids[-1]] * (rc.batch_size - len(ids))  # fixed shapes: pad the last chunk
            ro = sample_batch(ctx, rc, params, ids, jax.random.fold_in(key, i))
            completions = decode_completions(ctx, ro.responses[:len(chunk)], chat)
            for k, (scorer, texts) in scorers.items():
                rewards[k].extend(scorer([texts[j] for j in chunk], completions,
                                         [examples[j].reference for j in chunk]).tolist())
            logp = to_host(ref_logp_fn(params, ro.tokens))
            ref_logp = to_host(ref_logp_fn(ref, ro.tokens))
            mask = ro.response_mask
            log_r = (ref_logp - logp) * mask
            kls.extend((-log_r).sum(1)[:len(chunk)].tolist())
            k3s.extend(((np.expm1(log_r) - log_r) * mask).sum(1)[:len(chunk)].tolist())
        for k, values in rewards.items():
            out[f"reward_{k}_{name}" if k else f"reward_{name}"] = float(np.mean(values))
        if name == "policy":
            out["kl_policy"], out["kl_k3_policy"] = float(np.mean(kls)), float(np.mean(k3s))
    out["reward_gain"] = out["reward_policy"] - out["reward_reference"]
    for k in scorers:
        if k:
            out[f"reward_{k}_gain"] = out[f"reward_{k}_policy"] - out[f"reward_{k}_reference"]
    print(f"rlhf: held-out reward {out['reward_policy']:.4f} (reference "
          f"{out['reward_reference']:.4f}, gain {out['reward_gain']:+.4f}), KL to the reference "
          f"{out['kl_policy']:.3f} nats/sequence")
    return out
