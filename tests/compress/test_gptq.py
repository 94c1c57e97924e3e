"""GPTQ lowers a layer's output error below round-to-nearest on the same grid."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from llm.compress import quantize as Q
from llm.compress.gptq import gptq_2d


@pytest.mark.parametrize("method,group", [("int4", 16), ("int8", 64), ("nf4", 32)])
def test_gptq_reduces_output_error_vs_rounding(method, group):
    rng = np.random.default_rng(0)
    k, n, t = 64, 48, 512
    # correlated inputs with uneven feature scales, as in a real residual stream
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.normal(size=(t, k)) @ mix) * rng.uniform(0.2, 3.0, size=k)
    w = rng.normal(size=(k, n)).astype(np.float32)
    h = x.T @ x
    q2, scale = gptq_2d(w, h, method, group, damp=0.01)
    rtn = np.asarray(Q.dequantize(Q.quantize(jnp.asarray(w), (0,), method, group)))

    def out_err(wq):
        return float(np.sum((x @ w - x @ wq) ** 2))

    assert out_err(q2) < 0.8 * out_err(rtn), (out_err(q2), out_err(rtn))
    # GPTQ's result lies on its own grid: storing it as codes + scales loses nothing
    stored = Q.quantize(jnp.asarray(w), (0,), method, group, scale=jnp.asarray(scale, jnp.float32),
                        w2=jnp.asarray(q2, jnp.float32))
    np.testing.assert_allclose(np.asarray(Q.dequantize(stored)), q2, rtol=1e-5, atol=1e-6)
