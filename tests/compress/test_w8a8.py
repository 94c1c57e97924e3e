"""W8A8: the integer matmul equals a by-hand per-token quantized product, and a W8A8 model
runs through transformer.apply and survives the checkpoint layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.model import transformer
from llm.model.config import ModelConfig


def test_matmul_2d_equals_hand_quantized_product():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 32)).astype(np.float32) * rng.uniform(0.1, 4.0, size=(5, 1))
    w = rng.normal(size=(32, 12)).astype(np.float32)
    q = Q.quantize(jnp.asarray(w), (0,), "int8").replace(activations="int8")
    # by hand, in int64: per-token activation scale, per-channel weight scale
    a = np.abs(x).max(axis=1, keepdims=True) / 127.0
    xq = np.clip(np.round(x / a), -127, 127).astype(np.int64)
    s = np.abs(w).max(axis=0, keepdims=True) / 127.0
    wq = np.clip(np.round(w / s), -127, 127).astype(np.int64)
    want = (xq @ wq).astype(np.float64) * a * s
    got = np.asarray(q.matmul_2d(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    # and it is an approximation of the float product, within the two rounding steps
    assert np.max(np.abs(got - x @ w)) < 0.05 * np.max(np.abs(x @ w))


def test_w8a8_model_runs_close_to_float_and_round_trips_storage():
    cfg = ModelConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      vocab_size=128)
    graphdef, params = transformer.init(cfg, jax.random.key(0))
    _, _, axes = transformer.abstract(cfg)
    w8 = Q.quantize_params(params, axes, method="int8")
    w8a8 = Q.int8_activations(w8)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, size=(2, 8)), jnp.int32)
    f, a, b = (np.asarray(transformer.apply(graphdef, p, ids)) for p in (params, w8, w8a8))
    assert not np.array_equal(a, b)  # the integer path really ran
    assert np.max(np.abs(b - f)) < 0.02 * np.max(np.abs(f))
    arrays, meta = Q.to_storage(w8a8)
    back = Q.from_storage(arrays, meta)
    assert back["layer_0"]["mlp"]["wi"]["kernel"].activations == "int8"
    np.testing.assert_array_equal(np.asarray(transformer.apply(graphdef, back, ids)), b)
    with pytest.raises(ConfigError, match="int8 weights"):
        Q.int8_activations(Q.quantize_params(params, axes, method="int4", group_size=16))
