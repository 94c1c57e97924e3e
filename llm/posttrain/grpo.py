"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic, a KL penalty to
the reference inside the loss.

Each prompt is sampled G = RLConfig.samples_per_prompt times; a sample's advantage is its reward
standardised within its group,

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)       (std with Bessel's correction, as TRL)

and applies to every token of its response. The per-token loss is the clipped surrogate plus the
KL estimate (k3 by default, as the paper) to the reference, weighted by beta = RLConfig.kl_coef:

    l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * KL_t,  rho_t = pi/pi_old

averaged per sequence then over sequences ("sequence_mean", the paper), or over all response
tokens of the minibatch ("token_mean"; gin: grpo_loss_aggregation.mode). beta is fixed, or adapted
every step, from the KL of that step's own rollouts and before its update, towards
RLConfig.target_kl nats per sequence: Ziegler et al.'s controller (as PPO) with a floor
(RLConfig.kl_coef_min) and a proportional term (RLConfig.kl_gain; `llm.posttrain.kl`).

    python -m experiments.rlhf --gin_file=gin_configs/debug/grpo_tiny.gin
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp

from llm.config import ConfigError
from llm.posttrain import rl_loop
from llm.posttrain.context import RLHFContext
from llm.posttrain.kl import kl_estimate
from llm.posttrain.rl_loop import Algorithm, RLConfig, masked_mean, policy_logprobs

AGGREGATIONS = ("sequence_mean", "token_mean")


def group_advantages(scores: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
    """scores [groups * group_size] (a group's samples adjacent) -> advantages, same shape:
    (r - group mean) / (group sample std + eps). A group whose rewards are all equal gets 0."""
    groups = scores.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True, ddof=1) if group_size > 1 else 0.0
    return ((groups - mean) / (std + eps)).reshape(scores.shape)


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                      clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-token -min(rho A, clip(rho, 1-eps, 1+eps) A) and whether the clip was active.
    All [batch, seq]."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """[batch, seq] -> scalar: mean over each sequence's response tokens then over sequences
    ("sequence_mean"), or over all response tokens ("token_mean")."""
    if mode == "sequence_mean":
        return jnp.mean(masked_mean(per_token, mask, axis=1))
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    raise ConfigError(f"grpo_loss_aggregation.mode={mode!r} is not one of "
                      f"{', '.join(map(repr, AGGREGATIONS))}.")


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array,
              advantages: jax.Array, mask: jax.Array, *, clip_eps: float, beta: float,
              estimator: str = "k3", aggregation: str = "sequence_mean"
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO objective on per-token log-probs [batch, seq] of the current, old (sampling) and
    reference policies; advantages [batch] (one per sequence); mask [batch, seq] the response
    tokens. Returns (loss, metrics)."""
    adv = advantages[:, None]
    surrogate, clipped = clipped_surrogate(logp, old_logp, adv, clip_eps)
    kl = kl_estimate(logp, ref_logp, estimator)
    loss = aggregate(surrogate + beta * kl, mask, aggregation)
    return loss, {"policy_loss": aggregate(surrogate, mask, aggregation),
                  "kl_loss": aggregate(kl, mask, aggregation),
                  "clip_fraction": masked_mean(clipped, mask),
                  "approx_kl_old": masked_mean(0.5 * jnp.square(logp - old_logp), mask)}


@gin.configurable
def grpo_loss_aggregation(mode: str = "sequence_mean") -> str:
    """How GRPO averages its per-token loss (gin: grpo_loss_aggregation.mode)."""
    if mode not in AGGREGATIONS:
        raise ConfigError(f"grpo_loss_aggregation.mode={mode!r} is not one of "
                          f"{', '.join(map(repr, AGGREGATIONS))}.")
    return mode


def make_algorithm(graphdef, rc: RLConfig, aggregation: str = "sequence_mean") -> Algorithm:
    """GRPO's prepare/loss for the loop (`rl_loop.Algorithm`)."""

    def prepare(policy, ref, value, batch, kl_coef):
        del value, kl_coef
        mask = batch["response_mask"]
        old_logp, entropy = policy_logprobs(graphdef, policy, batch["tokens"], rc.temperature)
        ref_logp, _ = policy_logprobs(graphdef, ref, batch["tokens"], rc.temperature)
        log_r = (ref_logp - old_logp) * mask
        return {"old_logp": jax.lax.stop_gradient(old_logp),
                "ref_logp": jax.lax.stop_gradient(ref_logp),
                "advantages": group_advantages(batch["scores"], rc.samples_per_prompt),
                "kl": jnp.sum(-log_r, axis=1),
                "kl_k3": jnp.sum(kl_estimate(old_logp, ref_logp, "k3") * mask, axis=1),
                "entropy": masked_mean(entropy, mask, axis=1)}

    def loss(policy, value, mb, kl_coef):
        del value
        logp, _ = policy_logprobs(graphdef, policy, mb["tokens"], rc.temperature)
        return grpo_loss(logp, mb["old_logp"], mb["ref_logp"], mb["advantages"],
                         mb["response_mask"], clip_eps=rc.clip_eps, beta=kl_coef,
                         estimator=rc.kl_estimator, aggregation=aggregation)

    return Algorithm(name="grpo", init_value=None, prepare=prepare, loss=loss,
                     next_kl_coef=rl_loop.kl_controller(rc))


def train(ctx: RLHFContext) -> dict:
    """The `experiments.rlhf` entry point for rlhf.algorithm="grpo"."""
    algo = make_algorithm(ctx.base.graphdef, RLConfig(), grpo_loss_aggregation())
    return rl_loop.train(ctx, algo)
