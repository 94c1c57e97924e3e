"""GPTQ (Frantar et al. 2023): quantize a layer's input rows one at a time and push each row's
rounding error onto the rows not yet quantized, weighted by the inverse Hessian of the layer's
squared output error.

For y = x W with W2 [K, N] (contraction first, `quantize.to_2d`) and calibration inputs
X [T, K], the output error ||X W2 - X Q||^2 has Hessian H = 2 X^T X. With U the upper Cholesky
factor of H^{-1} (H^{-1} = U^T U), for k = 0..K-1:

    q_k  = quant(W2[k, :])                  (scale of k's group, from the current W2)
    e_k  = (W2[k, :] - q_k) / U[k, k]
    W2[k+1:, :] -= U[k, k+1:]^T e_k

This is the paper's algorithm without its lazy-batch blocking (a speed device that gives the
same result) and without act-order. The Hessian comes from the float model's inputs
(`calibrate.gram_matrices`), not re-collected layer by layer after quantizing earlier layers.
Runs in float64 numpy on the host.
"""

from __future__ import annotations

import numpy as np

from llm.compress import quantize as Q


def gptq_2d(w2: np.ndarray, hessian: np.ndarray, method: str, group_size: int,
            damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(Q2 [K, N] on the quantization grid, scale [K/g, N]) for W2 [K, N] and H [K, K].

    damp: fraction of the mean diagonal added to H (the paper's percdamp). Inputs that never
    fire (H[k, k] == 0) get their weight row zeroed, as in the reference implementation.
    """
    w = np.array(w2, np.float64)
    k, n = w.shape
    g = k if method == "int8" else group_size
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.zeros_like(w)
    scale = np.zeros((k // g, n), np.float64)
    levels = Q.NF4_LEVELS.astype(np.float64)
    for i in range(k):
        if i % g == 0:
            amax = np.max(np.abs(w[i:i + g]), axis=0)
            peak = {"int8": Q.INT8_MAX, "int4": Q.INT4_MAX, "nf4": 1.0}[method]
            scale[i // g] = np.where(amax > 0, amax / peak, 1.0)
        s = scale[i // g]
        x = w[i] / s
        if method == "int8":
            q[i] = np.clip(np.round(x), -Q.INT8_MAX, Q.INT8_MAX) * s
        elif method == "int4":
            q[i] = np.clip(np.round(x), -8, Q.INT4_MAX) * s
        else:
            q[i] = levels[np.argmin(np.abs(x[:, None] - levels), axis=1)] * s
        err = (w[i] - q[i]) / u[i, i]
        w[i + 1:] -= np.outer(u[i, i + 1:], err)
    return q, scale


def gptq_params(params: dict, logical_axes: dict, grams: dict[str, np.ndarray], *,
                method: str, group_size: int, damp: float = 0.01,
                embedding_method: str | None = None) -> dict:
    """`quantize.quantize_params` with every weight that has a calibration Gram matrix quantized
    by GPTQ (the rest, if any, by rounding). Returns the params dict with QArray leaves."""
    import jax
    import jax.numpy as jnp

    flat_axes = {Q._path_names(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    overrides = {}
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = Q._path_names(path)
        key = "/".join(names)
        dims = Q.contraction_dims(names, flat_axes[names])
        if dims is None or key not in grams:
            continue
        m = embedding_method if (names[-1] == "embedding" and embedding_method) else method
        k = int(np.prod([w.shape[d] for d in dims]))
        g = Q.check_group_size(m, k, group_size, key)
        w2 = np.asarray(Q.to_2d(w, dims), np.float64)
        q2, scale = gptq_2d(w2, grams[key], m, g, damp)
        overrides[key] = Q.quantize(w, dims, m, g, name=key,
                                    scale=jnp.asarray(scale, jnp.float32),
                                    w2=jnp.asarray(q2, jnp.float32))
    return Q.quantize_params(params, logical_axes, method=method, group_size=group_size,
                             embedding_method=embedding_method, overrides=overrides)
