"""AWQ: the scale search picks the error-minimising factor, folding keeps the float model's
output, and the quantized result beats round-to-nearest on an outlier-channel layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llm.compress import awq
from llm.compress import quantize as Q
from llm.model import transformer
from llm.model.config import ModelConfig

CFG = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  vocab_size=128)


def _rtn4(w, g):
    """Independent numpy int4 round-to-nearest, symmetric absmax per group of g rows."""
    k, n = w.shape
    blocks = w.reshape(k // g, g, n)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(blocks / scale), -8, 7) * scale).reshape(k, n)


def test_search_picks_the_scale_with_least_output_error():
    rng = np.random.default_rng(0)
    k, n, t, g = 8, 6, 64, 4
    x = rng.normal(size=(t, k)) * np.array([8.0, 0.3, 1.0, 0.5, 0.2, 4.0, 1.0, 0.1])
    w = rng.normal(size=(k, n))
    s, alpha, errs = awq.search_scale([w], x.T @ x, np.abs(x).mean(0), "int4", g, grid=10)
    # brute force with the explicit inputs: err(alpha) = ||X W - (X / s) Q(diag(s) W)||^2
    brute = []
    for i in range(10):
        a = np.abs(x).mean(0) ** (i / 10)
        a = a / np.sqrt(a.max() * a.min())
        brute.append(np.sum((x @ w - (x / a) @ _rtn4(w * a[:, None], g)) ** 2))
    np.testing.assert_allclose(errs, brute, rtol=1e-5)
    assert alpha == np.argmin(brute) / 10
    assert alpha > 0 and min(brute) < 0.9 * brute[0]  # outlier channels: scaling helps
    np.testing.assert_allclose(errs[0], np.sum((x @ w - x @ _rtn4(w, g)) ** 2), rtol=1e-5)


def test_clip_never_worse_than_absmax_per_group():
    rng = np.random.default_rng(1)
    k, n, g = 16, 5, 8
    x = rng.normal(size=(256, k))
    w = rng.standard_t(df=2, size=(k, n))  # heavy tails: clipping pays
    h = x.T @ x
    scale = awq.clip_scales(w, h, "int4", g)
    absmax = np.abs(w).reshape(k // g, g, n).max(1) / 7.0
    assert np.all(scale <= absmax + 1e-12) and np.any(scale < absmax - 1e-9)
    q = awq.rtn_2d(w, "int4", g, scale)
    for b in range(k // g):  # each (group, column) error is at most the unclipped one
        sl = slice(b * g, (b + 1) * g)
        d_clip, d_abs = (w - q)[sl], (w - _rtn4(w, g))[sl]
        hb = h[sl, sl]
        e_abs = np.einsum("gn,gh,hn->n", d_abs, hb, d_abs)
        assert np.all(np.einsum("gn,gh,hn->n", d_clip, hb, d_clip) <= e_abs * (1 + 1e-5))


def test_folded_scales_keep_the_float_model_output():
    _, params = transformer.init(CFG, jax.random.key(0))
    graphdef, _, axes = transformer.abstract(CFG)
    rng = np.random.default_rng(2)
    scales = {}
    for layer in awq.layer_names(params):
        for grp in awq.scale_groups(params, layer):
            k = Q.to_2d(awq._get(params, grp["weights"][0]),
                        Q.contraction_dims(grp["weights"][0].split("/"),
                                           awq._get(axes, grp["weights"][0]))).shape[0]
            s = rng.uniform(0.25, 4.0, size=k)
            if grp["name"].endswith("/o"):  # GQA: shared by the heads reading one kv head
                s = awq._gqa_tie(params, layer, s)
            scales[grp["name"]] = s
    assert {g.split("/")[1] for g in scales} == {"qkv", "o", "mlp_in", "mlp_out"}
    folded = awq.fold_scales(params, axes, scales)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(2, 16)), jnp.int32)
    forward = jax.jit(lambda p: transformer.apply(graphdef, p, ids))  # one compile, two calls
    a, b = forward(params), forward(folded)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)
    assert not np.allclose(np.asarray(folded["layer_0"]["attn"]["q"]["kernel"]),
                           np.asarray(params["layer_0"]["attn"]["q"]["kernel"]))


def test_awq_params_beats_rtn_on_calibration_error():
    """Whole-model path on a layer whose input has outlier channels: the AWQ model's
    layer output error is below round-to-nearest's, and the result runs as QArrays."""
    _, params = transformer.init(CFG, jax.random.key(1))
    _, _, axes = transformer.abstract(CFG)
    rng = np.random.default_rng(3)
    grams, acts = {}, {}
    for layer in awq.layer_names(params):
        for grp in awq.scale_groups(params, layer):
            w = awq._get(params, grp["weights"][0])
            k = Q.to_2d(w, Q.contraction_dims(grp["weights"][0].split("/"),
                                              awq._get(axes, grp["weights"][0]))).shape[0]
            x = rng.normal(size=(128, k)) * np.exp(rng.normal(size=k) * 1.2)
            grams[grp["inputs"]], acts[grp["inputs"]] = x.T @ x, np.abs(x).mean(0)
    qparams, alphas = awq.awq_params(params, axes, grams, acts, method="int4", group_size=16,
                                     grid=5)
    assert set(alphas) == {f"layer_{i}/{g}" for i in range(2)
                           for g in ("qkv", "o", "mlp_in", "mlp_out")}
    assert Q.is_qarray(qparams["layer_0"]["mlp"]["wi"]["kernel"])
    # mlp_in output error of wg (wi's columns also carry mlp_out's 1/s): AWQ (folded norm,
    # scaled, clipped rows) vs RTN, same inputs
    h = grams["layer_0/mlp/wi/kernel"]  # wi and wg share the input
    norm_ratio = (np.asarray(params["layer_0"]["mlp_norm"]["scale"])
                  / np.asarray(qparams["layer_0"]["mlp_norm"]["scale"]))  # = s
    w = np.asarray(params["layer_0"]["mlp"]["wg"]["kernel"], np.float64)
    w_awq = (np.asarray(Q.dequantize(qparams["layer_0"]["mlp"]["wg"]["kernel"]))
             / norm_ratio[:, None])
    w_rtn = _rtn4(w, 16)
    assert awq.output_error(w - w_awq, h) < awq.output_error(w - w_rtn, h)
