"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022; the TRL/"N implementation
details" recipe): a value model, GAE, a clipped policy objective, a clipped value loss, and a KL
penalty to the reference that is fixed or adaptive.

Per response token t of a sampled sequence (state = the prefix, action = token t):

    r_t = -kl_coef * KL_t   (+ the task reward on the last response token; KL_t the per-token
                            estimate of RLConfig.kl_estimator, k1 in Ziegler et al.)
    delta_t = r_t + gamma * V_{t+1} - V_t            (V after the last token = 0)
    A_t = delta_t + gamma * lam * A_{t+1}            (GAE), returns R_t = A_t + V_t
    policy loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))   (A whitened)
    value loss  = 0.5 mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2)

The value model is a decoder (initialised from the base run) with a scalar head
`value_head.kernel` [embed] (logical axis "embed") + bias, sharded like the policy. The KL
coefficient is fixed, or adapted after every step towards `RLConfig.target_kl` (Ziegler et al.;
`llm.posttrain.kl.adaptive_kl_coef`): kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch /
RLConfig.kl_horizon.

    python -m experiments.rlhf --gin_file=gin_configs/debug/ppo_tiny.gin
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ConfigError
from llm.model import transformer
from llm.posttrain import rl_loop
from llm.posttrain.context import RLHFContext
from llm.posttrain.kl import kl_estimate
from llm.posttrain.rl_loop import Algorithm, RLConfig, masked_mean, policy_logprobs


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO's own settings (gin: PPOConfig.*); the shared ones are in RLConfig.

    gamma / lam: discount and GAE lambda. value_clip: the value loss's clip range around the
    old values. vf_coef: the value loss's weight. whiten_advantages: standardise advantages over
    the batch's response tokens. (The adaptive KL controller is RLConfig.target_kl, shared
    with GRPO.)
    """

    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True

    def __post_init__(self):
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"PPOConfig.gamma={self.gamma} and PPOConfig.lam={self.lam} must "
                              "be in [0, 1].")


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens of each row.

    rewards, values, mask [batch, seq]: per-token reward, V(state before token t), 1 on the
    response (contiguous). Returns (advantages, returns = advantages + values), 0 off the mask.
    """
    def back(carry, xs):
        next_value, next_adv = carry
        r, v, m, next_m = xs
        delta = r + gamma * next_value * next_m - v
        adv = (delta + gamma * lam * next_adv * next_m) * m
        return (v, adv), adv

    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    xs = (rewards.T, values.T, mask.T, next_mask.T)
    init = (jnp.zeros_like(values[:, 0]), jnp.zeros_like(values[:, 0]))
    _, adv = jax.lax.scan(back, init, xs, reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries (population std), 0 off the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def clipped_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                        mask: jax.Array, clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate, masked token mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)),
    and the fraction of tokens where the clip is active. Inputs [batch, seq]."""
    ratio = jnp.exp(logp - old_logp)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return (masked_mean(jnp.maximum(loss1, loss2), mask),
            masked_mean((loss2 > loss1).astype(jnp.float32), mask))


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                       mask: jax.Array, clip: float) -> tuple[jax.Array, jax.Array]:
    """0.5 * masked mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), and the
    fraction of tokens where the clipped term is the larger. Inputs [batch, seq]."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    l1, l2 = jnp.square(values - returns), jnp.square(clipped - returns)
    return (0.5 * masked_mean(jnp.maximum(l1, l2), mask),
            masked_mean((l2 > l1).astype(jnp.float32), mask))


# ------------------------------------------------------------------------------ value model


def init_value(ctx: RLHFContext, key: jax.Array) -> tuple[dict, dict]:
    """The value model: a copy of the base decoder and a zero-initialised scalar head.
    Returns (params, logical axes)."""
    del key
    d = ctx.base.cfg.d_model
    params = {"backbone": jax.tree.map(jnp.copy, ctx.base.params),
              "head": {"kernel": np.zeros((d,), np.float32), "bias": np.zeros((), np.float32)}}
    axes = {"backbone": ctx.logical_axes, "head": {"kernel": ("embed",), "bias": ()}}
    return params, axes


def values_of(graphdef, value_params: dict, tokens: jax.Array) -> jax.Array:
    """V [batch, seq]: the value of the state before token t, read from the hidden state of
    position t - 1 (0 at t = 0)."""
    hidden = transformer.apply(graphdef, value_params["backbone"], tokens, return_hidden=True)
    head = value_params["head"]
    v = jnp.einsum("bsd,d->bs", hidden.astype(jnp.float32), head["kernel"]) + head["bias"]
    return jnp.concatenate([jnp.zeros_like(v[:, :1]), v[:, :-1]], axis=1)


def make_algorithm(graphdef, rc: RLConfig, pc: PPOConfig) -> Algorithm:
    """PPO's prepare/loss for the loop (`rl_loop.Algorithm`)."""
    if rc.kl_gain:
        raise ConfigError(f"RLConfig.kl_gain={rc.kl_gain} is GRPO's: PPO's KL penalty is part of "
                          "the rewards, shaped before the batch's KL is measured, so only the "
                          "integral controller (target_kl / kl_horizon) applies; set "
                          "RLConfig.kl_gain=0.")

    def prepare(policy, ref, value, batch, kl_coef):
        mask = batch["response_mask"]
        old_logp, entropy = policy_logprobs(graphdef, policy, batch["tokens"], rc.temperature)
        ref_logp, _ = policy_logprobs(graphdef, ref, batch["tokens"], rc.temperature)
        old_values = values_of(graphdef, value, batch["tokens"]) * mask
        k1 = kl_estimate(old_logp, ref_logp, "k1") * mask
        penalty = kl_estimate(old_logp, ref_logp, rc.kl_estimator) * mask
        last = mask * (1.0 - jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], 1))
        rewards = -kl_coef * penalty + batch["scores"][:, None] * last
        adv, returns = gae(rewards, old_values, mask, pc.gamma, pc.lam)
        if pc.whiten_advantages:
            adv = whiten(adv, mask)
        return jax.lax.stop_gradient({
            "old_logp": old_logp, "ref_logp": ref_logp, "old_values": old_values,
            "advantages": adv, "returns": returns, "kl": jnp.sum(k1, axis=1),
            "kl_k3": jnp.sum(kl_estimate(old_logp, ref_logp, "k3") * mask, axis=1),
            "entropy": masked_mean(entropy, mask, axis=1)})

    def loss(policy, value, mb, kl_coef):
        del kl_coef
        mask = mb["response_mask"]
        logp, _ = policy_logprobs(graphdef, policy, mb["tokens"], rc.temperature)
        pg_loss, clip_frac = clipped_policy_loss(logp, mb["old_logp"], mb["advantages"], mask,
                                                 rc.clip_eps)
        values = values_of(graphdef, value, mb["tokens"])
        vf_loss, vf_clip = clipped_value_loss(values, mb["old_values"], mb["returns"], mask,
                                              pc.value_clip)
        return pg_loss + pc.vf_coef * vf_loss, {
            "policy_loss": pg_loss, "value_loss": vf_loss, "clip_fraction": clip_frac,
            "value_clip_fraction": vf_clip,
            "approx_kl_old": masked_mean(0.5 * jnp.square(logp - mb["old_logp"]), mask)}

    return Algorithm(name="ppo", init_value=init_value, prepare=prepare, loss=loss,
                     next_kl_coef=rl_loop.kl_controller(rc))


def train(ctx: RLHFContext) -> dict:
    """The `experiments.rlhf` entry point for rlhf.algorithm="ppo"."""
    return rl_loop.train(ctx, make_algorithm(ctx.base.graphdef, RLConfig(), PPOConfig()))
