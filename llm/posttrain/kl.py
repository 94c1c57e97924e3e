"""Per-token estimators of KL(policy || reference) from samples of the policy (J. Schulman,
"Approximating KL divergence", 2020).

With x ~ policy and log r = log ref(x) - log policy(x):

    k1 = -log r                  unbiased, high variance, can be negative
    k2 = (log r)^2 / 2           biased (low bias near 0), always >= 0; its gradient is that of KL
    k3 = (r - 1) - log r         unbiased, always >= 0, low variance (GRPO's estimator)

All take log-probs of the sampled tokens, [batch, seq] fp32, and return [batch, seq].

`adaptive_kl_coef` is the adaptive KL controller of Ziegler et al. (2019) that PPO and GRPO
share (RLConfig.target_kl / kl_horizon / kl_coef_min), with a floor against wind-up;
`kl_coef_in_force` adds a proportional term to it (RLConfig.kl_gain), which makes it a PI
controller of log(coef).
"""

from __future__ import annotations

import math

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
                     batch: int, floor: float = 0.0) -> float:
    """The next KL coefficient of Ziegler et al.'s (2019) proportional controller,

        max(floor, coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon)),

    with kl the measured mean sequence KL (nats) of the batch just sampled; unchanged when
    target_kl is None. The coefficient moves by at most a factor (1 +- 0.2 * batch / horizon)
    per step. `floor` is anti-wind-up: while the policy is still near the reference (kl << target)
    the coefficient would otherwise shrink geometrically, and then needs many steps to climb back
    once the KL passes the target -- the KL overshoots meanwhile."""
    if target_kl is None:
        return coef
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return max(floor, coef * (1.0 + error * batch / horizon))


def kl_coef_in_force(integral: float, kl: float, target_kl: float | None, gain: float,
                     floor: float = 0.0) -> float:
    """The coefficient a step applies: the controller's integral state `integral` (the output of
    `adaptive_kl_coef`) times a proportional correction on the same step's KL,

        max(floor, integral * exp(gain * clip(kl / target - 1, -1, 1))),

    so log(coef) is a PI controller of the KL error (Ziegler et al.'s update is the integral
    term). Why: the KL responds to the coefficient with a lag (the optimizer's momentum carries
    the policy on), and an integral-only controller on such a plant overshoots and cycles; the
    proportional term acts at once (x e^gain at twice the target, x e^-gain at zero KL) and damps
    the cycle. gain 0 (or no target) is the integral state itself."""
    if target_kl is None or gain == 0:
        return integral
    error = min(max(kl / target_kl - 1.0, -1.0), 1.0)
    return max(floor, integral * math.exp(gain * error))
