"""PPO's pieces against hand-worked numbers: GAE, the clipped policy objective, the clipped
value loss, the KL estimators and the adaptive KL controller."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llm.posttrain.kl import adaptive_kl_coef as next_kl_coef
from llm.posttrain.kl import kl_estimate
from llm.posttrain.ppo import clipped_policy_loss, clipped_value_loss, gae, whiten


def test_gae_matches_a_hand_worked_example():
    # Row: one prompt position (mask 0), three response tokens, one pad. gamma 0.9, lambda 0.8.
    rewards = jnp.array([[9.0, 1.0, 0.0, 2.0, 7.0]])
    values = jnp.array([[3.0, 0.5, 1.0, 0.2, 5.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # By hand, backwards (V after the last response token = 0):
    #   delta_3 = 2 - 0.2 = 1.8                     A_3 = 1.8
    #   delta_2 = 0 + 0.9 * 0.2 - 1.0 = -0.82       A_2 = -0.82 + 0.72 * 1.8 = 0.476
    #   delta_1 = 1 + 0.9 * 1.0 - 0.5 = 1.4         A_1 = 1.4 + 0.72 * 0.476 = 1.74272
    np.testing.assert_allclose(adv, [[0.0, 1.74272, 0.476, 1.8, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, 2.24272, 1.476, 2.0, 0.0]], atol=1e-6)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = jnp.array([[0.5, -1.0, 3.0]])
    values = jnp.array([[1.0, 2.0, 0.0]])
    adv, _ = gae(rewards, values, jnp.ones((1, 3)), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[2.5 - 1.0, 2.0 - 2.0, 3.0 - 0.0]], atol=1e-6)


def test_clipped_policy_objective_by_hand():
    ratio = np.array([[1.5, 0.5, 1.1, 0.5, 9.0]])
    adv = jnp.array([[1.0, -1.0, 2.0, 1.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is not a response token
    old = jnp.zeros((1, 5))
    loss, clip_frac = clipped_policy_loss(jnp.log(ratio), old, adv, mask, clip_eps=0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)) per token:
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped)   r=0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)
    #   r=1.1, A=+2: max(-2.2, -2.2) = -2.2             r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.2 - 0.5) / 4, abs=1e-6)
    assert float(clip_frac) == pytest.approx(0.5)


def test_clipped_value_loss_by_hand():
    values = jnp.array([[1.5, 0.9, 2.0, 50.0]])
    old = jnp.array([[1.0, 1.0, 1.0, 1.0]])
    returns = jnp.array([[2.0, 0.0, 1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, frac = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # V=1.5 -> clipped 1.2: max(0.25, 0.64) = 0.64; V=0.9 in range: 0.81; V=2.0 -> 1.2:
    # max(1.0, 0.04) = 1.0. Loss 0.5 * mean = 0.5 * 2.45 / 3; the clipped term wins once.
    assert float(loss) == pytest.approx(0.5 * 2.45 / 3, abs=1e-6)
    assert float(frac) == pytest.approx(1 / 3)


def test_kl_estimators_by_hand():
    logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    # log r = log(0.25 / 0.5) = -ln 2
    assert float(kl_estimate(logp, ref, "k1")[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(kl_estimate(logp, ref, "k2")[0]) == pytest.approx(0.5 * math.log(2) ** 2,
                                                                   abs=1e-6)
    assert float(kl_estimate(logp, ref, "k3")[0]) == pytest.approx(0.5 - 1 + math.log(2),
                                                                   abs=1e-6)


def test_k1_and_k3_are_unbiased_for_kl():
    q = np.array([0.5, 0.3, 0.2])  # the policy, which samples
    p = np.array([0.2, 0.5, 0.3])  # the reference
    exact = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    logq, logp = jnp.log(jnp.asarray(q)), jnp.log(jnp.asarray(p))
    for est in ("k1", "k3"):
        expectation = float(jnp.sum(jnp.asarray(q) * kl_estimate(logq, logp, est)))
        assert expectation == pytest.approx(exact, abs=1e-6), est
    k3 = kl_estimate(logq, logp, "k3")
    assert bool(jnp.all(k3 >= 0))


def test_adaptive_kl_controller():
    # Ziegler et al.: error clipped to +-0.2, scaled by batch / horizon.
    assert next_kl_coef(0.1, kl=3.0, target_kl=2.0, horizon=1000, batch=100) == \
        pytest.approx(0.1 * 1.02)
    assert next_kl_coef(0.1, kl=1.9, target_kl=2.0, horizon=1000, batch=100) == \
        pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert next_kl_coef(0.1, kl=50.0, target_kl=None, horizon=1000, batch=100) == 0.1


def test_whiten_over_masked_entries():
    x = jnp.array([[1.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    np.testing.assert_allclose(whiten(x, mask), [[-1.0, 1.0, 0.0]], atol=1e-4)
