"""GRPO's group-relative advantages and loss against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llm.posttrain.grpo import group_advantages, grpo_loss


def test_group_advantages_by_hand():
    scores = jnp.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(scores, group_size=4, eps=0.0 + 1e-12)
    # group 1: mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3)
    std = math.sqrt(14 / 3)
    np.testing.assert_allclose(adv[:4], [-2 / std, -1 / std, 0.0, 3 / std], rtol=1e-5)
    # group 2: all equal -> no signal, and no NaN
    np.testing.assert_array_equal(group_advantages(scores, 4)[4:], [0.0, 0.0, 0.0, 0.0])
    # groups are independent: shifting one group's rewards leaves the other's unchanged
    shifted = group_advantages(scores.at[4:].add(jnp.array([0.0, 1.0, 2.0, 3.0])), 4)
    np.testing.assert_array_equal(shifted[:4], group_advantages(scores, 4)[:4])


def test_grpo_loss_by_hand():
    # Two sequences of 3 positions; position 0 is the prompt. Sequence a (A = +1) has ratios
    # 1.5 and 1.0; sequence b (A = -1) has one response token with ratio 0.5 and a pad.
    old = jnp.zeros((2, 3))
    logp = jnp.log(jnp.array([[1.0, 1.5, 1.0], [1.0, 0.5, 1.0]]))
    ref = logp - math.log(2)  # log r = -ln 2 everywhere: k3 = 0.5 - 1 + ln 2
    mask = jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv = jnp.array([1.0, -1.0])
    k3 = 0.5 - 1 + math.log(2)
    # surrogate -min(rA, clip(r, 0.8, 1.2)A): a: -1.2, -1.0; b: -min(-0.5, -0.8) = 0.8
    seq_a, seq_b = (-1.2 - 1.0) / 2 + 0.1 * k3, 0.8 + 0.1 * k3
    loss, m = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1,
                        aggregation="sequence_mean")
    assert float(loss) == pytest.approx((seq_a + seq_b) / 2, abs=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(2 / 3)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1,
                        aggregation="token_mean")
    assert float(loss) == pytest.approx((-1.2 - 1.0 + 0.8) / 3 + 0.1 * k3, abs=1e-6)


def test_grpo_gradient_pushes_up_the_better_sample():
    import jax

    old = jnp.zeros((2, 2))
    mask = jnp.array([[0.0, 1.0], [0.0, 1.0]])
    adv = group_advantages(jnp.array([1.0, 0.0]), 2)

    def f(logp):
        return grpo_loss(logp, old, old, adv, mask, clip_eps=0.2, beta=0.0)[0]

    g = jax.grad(f)(old)
    assert float(g[0, 1]) < 0 < float(g[1, 1])  # descent raises the rewarded token's log-prob
