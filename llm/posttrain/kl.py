"""Per-token estimators of KL(policy || reference) from samples of the policy (J. Schulman,
"Approximating KL divergence", 2020).

With x ~ policy and log r = log ref(x) - log policy(x):

    k1 = -log r                  unbiased, high variance, can be negative
    k2 = (log r)^2 / 2           biased (low bias near 0), always >= 0; its gradient is that of KL
    k3 = (r - 1) - log r         unbiased, always >= 0, low variance (GRPO's estimator)

All take log-probs of the sampled tokens, [batch, seq] fp32, and return [batch, seq].

`adaptive_kl_coef` is the adaptive KL controller of Ziegler et al. (2019) that PPO and GRPO
share (RLConfig.target_kl / RLConfig.kl_horizon).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.config import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token KL(policy || reference) estimate from the policy's and the reference's
    log-probs of the same sampled tokens."""
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    if estimator == "k3":
        return jnp.expm1(log_r) - log_r
    raise ConfigError(f"kl estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}; "
                      "set RLConfig.kl_estimator to one of them.")


def adaptive_kl_coef(coef: float, kl: float, target_kl: float | None, horizon: int,
                     batch: int) -> float:
    """The next KL coefficient of Ziegler et al.'s (2019) proportional controller:
    coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon), with kl the measured mean
    sequence KL (nats) of the batch just sampled; unchanged when target_kl is None. The
    coefficient can move by at most a factor (1 +- 0.2 * batch / horizon) per step."""
    if target_kl is None:
        return coef
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * batch / horizon)
