"""Distillation losses against hand-computed values on tiny distributions (and scipy's
entropy / Jensen-Shannon as a second, independent reference), the temperature / hard-label mix,
and offline top-k = online when k is the vocabulary size."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from llm.config import ConfigError
from llm.distill.losses import DistillLoss, distill_sums, divergence, soft_targets

P = [0.8, 0.15, 0.05]  # teacher
Q = [0.5, 0.3, 0.2]    # student


def logs(p):
    return jnp.log(jnp.asarray(p, jnp.float32))


def test_forward_kl_by_hand():
    want = 0.8 * math.log(0.8 / 0.5) + 0.15 * math.log(0.15 / 0.3) + 0.05 * math.log(0.05 / 0.2)
    got = float(divergence(logs(P), logs(Q), "forward_kl"))
    assert got == pytest.approx(want, abs=1e-6)
    assert got == pytest.approx(entropy(P, Q), abs=1e-6)


def test_reverse_kl_by_hand():
    want = 0.5 * math.log(0.5 / 0.8) + 0.3 * math.log(0.3 / 0.15) + 0.2 * math.log(0.2 / 0.05)
    got = float(divergence(logs(P), logs(Q), "reverse_kl"))
    assert got == pytest.approx(want, abs=1e-6)
    assert got == pytest.approx(entropy(Q, P), abs=1e-6)
    assert got != pytest.approx(float(divergence(logs(P), logs(Q), "forward_kl")), abs=1e-3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_by_hand(beta):
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    want = (beta * sum(p * math.log(p / mi) for p, mi in zip(P, m))
            + (1 - beta) * sum(q * math.log(q / mi) for q, mi in zip(Q, m)))
    got = float(divergence(logs(P), logs(Q), "jsd", beta))
    assert got == pytest.approx(want, abs=1e-6)
    if beta == 0.5:  # the Jensen-Shannon divergence: scipy gives its square root (natural log)
        assert got == pytest.approx(jensenshannon(P, Q) ** 2, abs=1e-6)


def test_zero_teacher_probability_is_finite():
    """A token the teacher rules out (logit -1e9, probability 0) adds exactly 0, never NaN."""
    t = jnp.array([[[0.0, 1.0, -1e9]]])
    s = jnp.array([[[0.3, -0.2, 0.1]]])
    t_logp, s_logp = soft_targets(s, t)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert np.isfinite(float(divergence(t_logp, s_logp, kind)[0, 0]))
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    q = np.exp([0.3, -0.2, 0.1]) / np.exp([0.3, -0.2, 0.1]).sum()
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q[:2]))
    assert float(divergence(t_logp, s_logp, "forward_kl")[0, 0]) == pytest.approx(want, abs=1e-6)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_and_hard_label_mix_by_hand():
    """nll = alpha * CE(student, target) + (1 - alpha) * T^2 * KL(p_T || q_T), summed over the
    unmasked positions, each term written out with numpy."""
    rng = np.random.default_rng(0)
    t_logits = rng.normal(size=(1, 3, 5)).astype(np.float32) * 3
    s_logits = rng.normal(size=(1, 3, 5)).astype(np.float32)
    targets = np.array([[1, 4, 2]])
    mask = np.array([[1.0, 1.0, 0.0]], np.float32)
    T, alpha = 2.0, 0.3
    cfg = DistillLoss(divergence="forward_kl", temperature=T, alpha=alpha)
    sums = distill_sums(jnp.asarray(s_logits), jnp.asarray(targets), jnp.asarray(mask), cfg,
                        teacher_logits=jnp.asarray(t_logits))
    ce = kl = 0.0
    for j in range(2):  # position 2 is masked out
        ce += -math.log(_softmax(s_logits[0, j])[targets[0, j]])
        p, q = _softmax(t_logits[0, j] / T), _softmax(s_logits[0, j] / T)
        kl += float(np.sum(p * np.log(p / q)))
    assert float(sums["hard_nll"]) == pytest.approx(ce, rel=1e-5)
    assert float(sums["divergence"]) == pytest.approx(kl, rel=1e-5)
    assert float(sums["nll"]) == pytest.approx(alpha * ce + (1 - alpha) * T * T * kl, rel=1e-5)
    assert float(sums["tokens"]) == 2.0


def test_hard_mask_turns_the_hard_label_term_off():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.normal(size=(1, 4, 6)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(1, 4, 6)), jnp.float32)
    targets, mask = jnp.array([[0, 1, 2, 3]]), jnp.ones((1, 4))
    cfg = DistillLoss(alpha=0.5)
    full = distill_sums(s, targets, mask, cfg, teacher_logits=t)
    half = distill_sums(s, targets, mask, cfg, teacher_logits=t,
                        hard_mask=jnp.array([[1.0, 1.0, 0.0, 0.0]]))
    assert float(half["divergence"]) == pytest.approx(float(full["divergence"]), rel=1e-6)
    assert 0 < float(half["hard_nll"]) < float(full["hard_nll"])


def test_the_teacher_gets_no_gradient():
    s = jnp.ones((1, 2, 4))
    t = jnp.arange(8.0).reshape(1, 2, 4)
    cfg = DistillLoss(divergence="jsd")
    g = jax.grad(lambda t: distill_sums(s, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), cfg,
                                        teacher_logits=t)["nll"])(t)
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_offline_topk_equals_online_at_full_vocabulary(kind):
    """k = vocabulary size: the stored top-k (sorted, so a permutation of the vocabulary) gives
    the online loss and the online gradient."""
    rng = np.random.default_rng(2)
    vocab = 16
    s = jnp.asarray(rng.normal(size=(2, 5, vocab)) * 2, jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 5, vocab)) * 2, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (2, 5)))
    mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)
    cfg = DistillLoss(divergence=kind, temperature=1.7, alpha=0.25, beta=0.3)
    values, indices = jax.lax.top_k(t, vocab)

    def online(s):
        return distill_sums(s, targets, mask, cfg, teacher_logits=t)["nll"]

    def offline(s):
        return distill_sums(s, targets, mask, cfg, topk_values=values,
                            topk_indices=indices)["nll"]

    assert float(offline(s)) == pytest.approx(float(online(s)), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(jax.grad(offline)(s), jax.grad(online)(s), atol=1e-6)


def test_offline_topk_truncates_the_teacher_not_the_student():
    """k = 2 of 4: the teacher is its softmax over its two best tokens (0 elsewhere), the student
    its full softmax; forward KL and JSD written out over all 4 tokens."""
    t = jnp.array([[[3.0, 0.0, 1.0, -2.0]]])
    s = jnp.array([[[0.5, 2.0, -1.0, 0.0]]])
    values, indices = jax.lax.top_k(t, 2)  # tokens 0 and 2
    p = np.zeros(4)
    p[[0, 2]] = np.exp([3.0, 1.0]) / np.exp([3.0, 1.0]).sum()
    q = np.exp([0.5, 2.0, -1.0, 0.0]) / np.exp([0.5, 2.0, -1.0, 0.0]).sum()
    beta = 0.3
    m = beta * p + (1 - beta) * q
    want = {"forward_kl": sum(p[i] * math.log(p[i] / q[i]) for i in (0, 2)),
            "jsd": (beta * sum(p[i] * math.log(p[i] / m[i]) for i in (0, 2))
                    + (1 - beta) * sum(q[i] * math.log(q[i] / m[i]) for i in range(4)))}
    for kind, value in want.items():
        got = distill_sums(s, jnp.array([[0]]), jnp.ones((1, 1)),
                           DistillLoss(divergence=kind, beta=beta), topk_values=values,
                           topk_indices=indices)["divergence"]
        assert float(got) == pytest.approx(value, abs=1e-6), kind
    with pytest.raises(ConfigError, match="reverse_kl"):
        distill_sums(s, jnp.array([[0]]), jnp.ones((1, 1)), DistillLoss(divergence="reverse_kl"),
                     topk_values=values, topk_indices=indices)


@pytest.mark.parametrize("kwargs, names", [
    ({"divergence": "kl"}, "DistillLoss.divergence='kl'"),
    ({"temperature": 0.0}, "DistillLoss.temperature=0.0"),
    ({"alpha": 1.5}, "DistillLoss.alpha=1.5"),
    ({"divergence": "jsd", "beta": 1.0}, "DistillLoss.beta=1.0"),
])
def test_bad_settings_are_one_line_config_errors(kwargs, names):
    with pytest.raises(ConfigError) as e:
        DistillLoss(**kwargs)
    assert names in str(e.value).splitlines()[0]


def _grad_nll(s, t, cfg, mask):
    targets = jnp.zeros(s.shape[:2], jnp.int32)
    return np.asarray(jax.grad(lambda s: distill_sums(s, targets, jnp.asarray(mask), cfg,
                                                      teacher_logits=t)["nll"])(s))


def test_forward_kl_gradient_is_hintons_formula():
    """d/dz [T^2 KL(p_T || q_T)] = T (q_T - p_T) per position (Hinton et al. 2015, eq. 2 times
    the T^2 factor); masked positions get no gradient."""
    rng = np.random.default_rng(3)
    s = rng.normal(size=(1, 3, 7)) * 2
    t = rng.normal(size=(1, 3, 7)) * 2
    mask = np.array([[1.0, 0.0, 1.0]], np.float32)
    T = 2.5
    got = _grad_nll(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                    DistillLoss(divergence="forward_kl", temperature=T), mask)
    for j in range(3):
        want = T * (_softmax(s[0, j] / T) - _softmax(t[0, j] / T)) * mask[0, j]
        np.testing.assert_allclose(got[0, j], want, atol=2e-6)


def test_reverse_kl_gradient_by_hand():
    """d/dz [T^2 KL(q_T || p_T)] = T q_i (log q_i - log p_i - KL(q_T || p_T)), q = softmax(z/T)."""
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(1, 2, 5)) * 2, rng.normal(size=(1, 2, 5)) * 2
    T = 1.5
    got = _grad_nll(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                    DistillLoss(divergence="reverse_kl", temperature=T), np.ones((1, 2)))
    for j in range(2):
        q, p = _softmax(s[0, j] / T), _softmax(t[0, j] / T)
        kl_qp = float(np.sum(q * np.log(q / p)))
        np.testing.assert_allclose(got[0, j], T * q * (np.log(q / p) - kl_qp), atol=2e-6)


def test_jsd_gradient_matches_float64_finite_differences():
    """The generalized JSD's gradient (beta 0.3, T 2) against central differences of the JSD
    written in float64 numpy."""
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=6) * 2, rng.normal(size=6) * 2
    T, beta = 2.0, 0.3

    def jsd(z):
        p, q = _softmax(t / T), _softmax(z / T)
        m = beta * p + (1 - beta) * q
        return T * T * (beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m)))

    eps = 1e-5
    want = np.array([(jsd(s + eps * e) - jsd(s - eps * e)) / (2 * eps) for e in np.eye(6)])
    got = _grad_nll(jnp.asarray(s[None, None], jnp.float32),
                    jnp.asarray(t[None, None], jnp.float32),
                    DistillLoss(divergence="jsd", temperature=T, beta=beta), np.ones((1, 1)))
    np.testing.assert_allclose(got[0, 0], want, atol=1e-5)


def test_t_squared_keeps_the_gradient_scale_at_high_temperature():
    """Hinton et al.'s high-temperature limit: for zero-mean logits, the T^2-scaled forward-KL
    gradient tends to (z - v) / N (N = vocabulary size), whatever T; without T^2 it would
    shrink as 1 / T^2."""
    rng = np.random.default_rng(6)
    n = 8
    s, t = rng.normal(size=n), rng.normal(size=n)
    s, t = s - s.mean(), t - t.mean()
    want = (s - t) / n
    for T in (200.0, 1000.0):  # the limit's error is O(1 / T): 2.6% of the largest at T = 50
        got = _grad_nll(jnp.asarray(s[None, None], jnp.float32),
                        jnp.asarray(t[None, None], jnp.float32),
                        DistillLoss(divergence="forward_kl", temperature=T), np.ones((1, 1)))
        np.testing.assert_allclose(got[0, 0], want, atol=0.01 * np.abs(want).max())
