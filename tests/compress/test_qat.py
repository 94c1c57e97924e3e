"""The QAT gin switch: the loss sees fake-quantized weights; the gradient passes straight
through to the float weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.compress import quantize as Q
from llm.compress.qat import qat
from llm.config import ConfigError
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.train.loss import decoder_loss

CFG = ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                  vocab_size=64)


def test_qat_loss_and_ste_gradient():
    graphdef, params = transformer.init(CFG, jax.random.key(0))
    _, abstract_params, axes = transformer.abstract(CFG)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 64, size=(2, 16)), jnp.int32)
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1),
             "loss_mask": jnp.ones_like(ids, jnp.float32), "segment_ids": jnp.ones_like(ids),
             "positions": jnp.broadcast_to(jnp.arange(16), ids.shape)}
    base = decoder_loss(graphdef)
    assert qat(base, abstract_params, axes) is base  # off by default
    wrapped = qat(base, abstract_params, axes, method="int4", group_size=16)
    fq = Q.fake_quantize_params(params, axes, "int4", 16)
    assert float(wrapped(params, batch)["nll"]) == pytest.approx(float(base(fq, batch)["nll"]),
                                                                 rel=1e-6)
    assert float(wrapped(params, batch)["nll"]) != pytest.approx(
        float(base(params, batch)["nll"]), rel=1e-6)
    # STE with absmax scales: every weight is in range, so d loss(fq(W)) / dW = d loss / d fq
    g_qat = jax.grad(lambda p: wrapped(p, batch)["nll"])(params)
    g_at_fq = jax.grad(lambda p: base(p, batch)["nll"])(fq)
    for a, b in zip(jax.tree.leaves(g_qat), jax.tree.leaves(g_at_fq)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_qat_bad_group_size_fails_before_training():
    _, abstract_params, axes = transformer.abstract(CFG)
    with pytest.raises(ConfigError, match="group_size=24"):
        qat(decoder_loss(None), abstract_params, axes, method="int4", group_size=24)
