"""Quantization round trips against independent numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.compress import quantize as Q
from llm.config import ConfigError


def test_int8_error_within_per_channel_bound():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(96, 40)).astype(np.float32) * rng.uniform(0.1, 3.0, size=(1, 40))
    q = Q.quantize(jnp.asarray(w), (0,), "int8")
    assert q.codes.dtype == jnp.int8 and q.codes.shape == (96, 40) and q.scale.shape == (1, 40)
    # Independent bound: a per-output-channel step of max|w[:, n]| / 127, rounding error <= half.
    step = np.abs(w).max(axis=0) / 127.0
    err = np.abs(np.asarray(Q.dequantize(q)) - w)
    assert np.all(err <= step / 2 + 1e-6 * step)
    assert np.all(err.max(axis=0) > step / 10)  # it really rounds (not a copy)


def test_int8_contraction_over_leading_dims_of_a_3d_weight():
    # attention-out kernel [heads, head_dim, embed]: one scale per embed channel
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 8, 16)).astype(np.float32)
    q = Q.quantize(jnp.asarray(w), (0, 1), "int8")
    assert q.scale.shape == (1, 16)
    step = np.abs(w).reshape(32, 16).max(axis=0) / 127.0
    assert np.all(np.abs(np.asarray(Q.dequantize(q)) - w) <= step / 2 + 1e-7)


def test_int4_pack_unpack_exact():
    rng = np.random.default_rng(2)
    nibbles = rng.integers(0, 16, size=(64, 24)).astype(np.uint8)
    packed = Q.pack_int4(jnp.asarray(nibbles))
    assert packed.shape == (32, 24) and packed.dtype == jnp.uint8
    # hand layout: row 2i low nibble, row 2i+1 high nibble
    assert np.array_equal(np.asarray(packed), nibbles[0::2] + 16 * nibbles[1::2])
    assert np.array_equal(np.asarray(Q.unpack_int4(packed)), nibbles)


def test_int4_groupwise_error_within_group_bound():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 10)).astype(np.float32)
    q = Q.quantize(jnp.asarray(w), (0,), "int4", group_size=16)
    assert q.codes.shape == (32, 10) and q.scale.shape == (4, 10)
    step = np.abs(w).reshape(4, 16, 10).max(axis=1) / 7.0  # [groups, N]
    err = np.abs(np.asarray(Q.dequantize(q)) - w).reshape(4, 16, 10)
    assert np.all(err <= step[:, None, :] / 2 + 1e-6)
    assert q.bits_per_weight == pytest.approx(4 + 32 / 16)


def test_nf4_codes_are_nearest_levels():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(32, 6)).astype(np.float32)
    q = Q.quantize(jnp.asarray(w), (0,), "nf4", group_size=32)
    absmax = np.abs(w).max(axis=0)
    nearest = Q.NF4_LEVELS[np.argmin(np.abs((w / absmax)[..., None] - Q.NF4_LEVELS), -1)]
    np.testing.assert_allclose(np.asarray(Q.dequantize(q)), nearest * absmax, rtol=1e-6)


@pytest.mark.parametrize("group_size", [48, 7, 0])
def test_bad_group_size_is_one_line_error(group_size):
    with pytest.raises(ConfigError) as e:
        Q.quantize(jnp.ones((64, 8)), (0,), "int4", group_size=group_size)
    assert "group_size" in str(e.value) and "\n" not in str(e.value)


def test_ste_gradient_identity_inside_range_zero_outside():
    w = jnp.array([[-3.0, -0.2], [0.05, 0.7], [2.5, -0.69]], jnp.float32)  # K=3, N=2
    scale = jnp.full((1, 2), 0.1, jnp.float32)  # int4 codes reach [-0.8, 0.7]
    upstream = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    grad = jax.grad(lambda x: jnp.sum(Q.ste_quantize_2d(x, scale, "int4") * upstream))(w)
    inside = np.array([[False, True], [True, True], [False, True]])
    np.testing.assert_array_equal(np.asarray(grad), np.where(inside, upstream, 0.0))
    # inside means w / scale in [-8.5, 7.5] (rounds to a code without clipping); the forward value
    # is the quantized weight, clipped outside
    np.testing.assert_allclose(np.asarray(Q.ste_quantize_2d(w, scale, "int4")),
                               [[-0.8, -0.2], [0.0, 0.7], [0.7, -0.7]], atol=1e-6)


def test_fake_quantize_forward_equals_quantize_dequantize():
    w = jax.random.normal(jax.random.key(0), (4, 8, 32))
    fq = Q.fake_quantize(w, (0, 1), "int4", group_size=16)
    np.testing.assert_allclose(fq, Q.dequantize(Q.quantize(w, (0, 1), "int4", 16)), atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(Q.fake_quantize(x, (0, 1), "int4", 16) ** 2))(w)
    assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g)))
