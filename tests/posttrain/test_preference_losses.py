"""Bradley-Terry, DPO and IPO losses against hand-computed values and TRL's formulas, and the
DPO loss function on a tiny decoder."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import transformer
from llm.model.config import ModelConfig
from llm.posttrain import dpo, reward_model


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_bradley_terry_hand_computed():
    chosen, rejected = jnp.array([2.0, 0.5, 9.0]), jnp.array([1.0, 1.5, 0.0])
    weight = jnp.array([1.0, 1.0, 0.0])  # the third pair is padding
    out = reward_model.bradley_terry(chosen, rejected, weight)
    # -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-1) = log(1 + e)
    assert float(out["nll"]) == pytest.approx(0.31326168751822286 + 1.3132616875182228,
                                              rel=1e-6)
    assert float(out["tokens"]) == 2 and float(out["correct"]) == 1
    assert float(out["margin"]) == pytest.approx(0.0, abs=1e-6)
    out = reward_model.bradley_terry(chosen, rejected, weight, margin=0.5, center_coef=0.01)
    assert float(out["nll"]) == pytest.approx(softplus(-0.5) + softplus(1.5), rel=1e-6)
    assert float(out["z_loss"]) == pytest.approx(0.01 * (3.0 ** 2 + 2.0 ** 2), rel=1e-6)


def trl_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type, label_smoothing=0.0):
    """TRL DPOTrainer.dpo_loss (v0.9-0.12), transcribed with numpy."""
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    logsig = lambda x: -np.logaddexp(0.0, -x)
    if loss_type == "sigmoid":
        losses = (-logsig(beta * logits) * (1 - label_smoothing)
                  - logsig(-beta * logits) * label_smoothing)
    else:  # "ipo"
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pi_c - ref_c), beta * (pi_r - ref_r)


def test_dpo_and_ipo_hand_computed():
    # pi_c = -10, pi_r = -12, ref_c = ref_r = -11: h = 2
    args = [jnp.array([x]) for x in (-10.0, -12.0, -11.0, -11.0)]
    losses, r_c, r_r = dpo.preference_loss(*args, beta=0.1)
    assert float(losses[0]) == pytest.approx(softplus(-0.2), rel=1e-6)  # 0.598139
    assert float(r_c[0]) == pytest.approx(0.1) and float(r_r[0]) == pytest.approx(-0.1)
    losses, _, _ = dpo.preference_loss(*args, beta=0.1, label_smoothing=0.1)
    assert float(losses[0]) == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2),
                                             rel=1e-6)
    losses, _, _ = dpo.preference_loss(*args, beta=0.1, loss_type="ipo")
    assert float(losses[0]) == pytest.approx((2.0 - 5.0) ** 2, rel=1e-6)  # (h - 1/(2 beta))^2


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                  ("ipo", 0.0)])
def test_dpo_matches_trl_formula(loss_type, smoothing):
    rng = np.random.default_rng(0)
    x = [rng.normal(-20, 5, 16) for _ in range(4)]
    ours = dpo.preference_loss(*map(jnp.asarray, x), beta=0.3, loss_type=loss_type,
                               label_smoothing=smoothing)
    ref = trl_dpo_loss(*x, beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)


CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                  attention_impl="xla")


def tiny_batch(rows: int = 4, seq: int = 12):
    rng = np.random.default_rng(3)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[side] = rng.integers(2, CFG.vocab_size, (rows, seq)).astype(np.int32)
        mask = np.zeros((rows, seq), np.float32)
        for i in range(rows):
            mask[i, 4:4 + 2 + i] = 1.0  # response lengths 2..5
        batch[f"{side}_mask"] = mask
    batch["chosen_mask"][-1] = batch["rejected_mask"][-1] = 0.0  # a padding pair
    return batch


def logp_by_hand(params, tokens, mask):
    """Sum over masked t of log softmax(logits[t-1])[tokens[t]], with numpy."""
    logits = np.asarray(APPLY(GRAPHDEF, params, jnp.asarray(tokens)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out = np.zeros(tokens.shape[0])
    for i in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            out[i] += mask[i, t] * logp[i, t - 1, tokens[i, t]]
    return out


GRAPHDEF, PARAMS = transformer.init(CFG, jax.random.key(0))
APPLY = jax.jit(transformer.apply, static_argnums=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_fn_on_a_decoder(loss_type):
    batch = tiny_batch()
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    ref_params = jax.tree.map(lambda x: x * 1.05, PARAMS)  # a different reference
    rows = dpo.reference_logps(GRAPHDEF, ref_params, batch, 4, mesh, ())
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(rows[f"ref_{side}"].sum(1),
                                   logp_by_hand(ref_params, batch[side], batch[f"{side}_mask"]),
                                   rtol=1e-4)
    cfg = dpo.DPOConfig(beta=0.5, loss_type=loss_type)
    sums = jax.jit(dpo.dpo_loss_fn(GRAPHDEF, cfg))(PARAMS, {k: jnp.asarray(v)
                                                            for k, v in rows.items()})
    pi = {s: logp_by_hand(PARAMS, batch[s], batch[f"{s}_mask"]) for s in ("chosen", "rejected")}
    ref = {s: rows[f"ref_{s}"].sum(1) for s in ("chosen", "rejected")}
    if loss_type == "ipo":
        n = batch["chosen_mask"].sum(1), batch["rejected_mask"].sum(1)
        n = [np.maximum(x, 1) for x in n]
        pi = {"chosen": pi["chosen"] / n[0], "rejected": pi["rejected"] / n[1]}
        ref = {"chosen": ref["chosen"] / n[0], "rejected": ref["rejected"] / n[1]}
    losses, r_c, r_r = trl_dpo_loss(pi["chosen"], pi["rejected"], ref["chosen"], ref["rejected"],
                                    0.5, loss_type)
    assert float(sums["tokens"]) == 3  # the padding pair weighs nothing
    assert float(sums["nll"]) == pytest.approx(losses[:3].sum(), rel=1e-4)
    assert float(sums["correct"]) == np.sum(r_c[:3] > r_r[:3])
    assert float(sums["per_token/reward_margin"]) == pytest.approx((r_c - r_r)[:3].sum(),
                                                                   rel=1e-4, abs=1e-5)


def test_dpo_at_the_reference_and_one_step_away():
    """Policy == reference: loss log 2, implicit rewards 0, accuracy 1/2 (ties). One gradient
    step then raises the chosen responses' implicit reward above the rejected ones'."""
    batch = tiny_batch()
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    rows = {k: jnp.asarray(v) for k, v in
            dpo.reference_logps(GRAPHDEF, PARAMS, batch, 4, mesh, ()).items()}
    loss_fn = jax.jit(dpo.dpo_loss_fn(GRAPHDEF, dpo.DPOConfig(beta=0.1)))
    sums = loss_fn(PARAMS, rows)
    assert float(sums["nll"]) / 3 == pytest.approx(math.log(2), rel=1e-6)
    assert float(sums["correct"]) == 1.5
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, rows)["nll"]))(PARAMS)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, PARAMS, grads)
    after = loss_fn(stepped, rows)
    assert float(after["nll"]) < float(sums["nll"])
    assert float(after["per_token/reward_margin"]) > 0
