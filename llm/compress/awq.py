"""AWQ (Lin et al. 2023): activation-aware weight quantization.

A few input channels carry much larger activations than the rest, and the rounding error of
their weight rows costs the most output error. AWQ scales those rows up before rounding and
the inputs down by the same factor, an exact identity in float:

    y = x W = (x / s) (diag(s) W2)          s [K] > 0, one factor per input channel

so the quantized layer is  y ~ (x / s) Q(diag(s) W2). The 1/s is folded into the op that
produces x, so the quantized model runs with no extra work:

    q, k, v  (input: attn_norm(x))      attn_norm.scale (and bias) /= s; rows of q, k, v *= s
    wi, wg   (input: mlp_norm(x))       mlp_norm.scale  (and bias) /= s; rows of wi, wg *= s
    wo       (input: silu(x wg) * x wi) columns of wi /= s;  rows of wo *= s  (SwiGLU only)
    o        (input: attention output)  columns of v /= s;   rows of o *= s; with GQA, one
                                         factor per kv channel, shared by the query heads
                                         that read it (head h reads kv head h // (H / KV))

The factor is searched per group of weights sharing one input (the paper's grid):

    s(alpha) = a^alpha / sqrt(max(a^alpha) min(a^alpha)),  a [K] = mean_t |X[t, k]|,
    alpha in {0, 1/20, ..., 19/20};  err(alpha) = sum_W ||X W2 - (X / s) Q(diag(s) W2)||^2

and the alpha with the least err is kept. With H = X^T X (`calibrate.input_statistics`) the
error is exactly trace(D^T H D), D = W2 - Q(diag(s) W2) / s, so the search needs no second pass
over the data. alpha = 0 is plain round-to-nearest, so on the calibration set AWQ is never
worse than RTN. After scaling, AWQ's weight clipping (the paper's code, `auto_clip`) searches
per group and output channel a shrink r in {1, 0.95, ..., 0.55} of the group's max |w| that
minimises that group's own output error D_g^T H_gg D_g (its diagonal block of H, in the scaled
input space); as in the reference, q and k are not clipped.

Like the reference: every scale is searched on the float block's weights and inputs before any
is folded; the tied embedding/output matrix is not scaled (its rows are also the lookup table)
and is quantized by rounding. Runs in numpy float64 on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llm.compress import quantize as Q
from llm.config import ConfigError

GRID = 20
CLIP_RATIOS = tuple(1.0 - i / GRID for i in range(GRID // 2))  # 1.0 .. 0.55


def rtn_2d(w2: np.ndarray, method: str, group_size: int,
           scale: np.ndarray | None = None) -> np.ndarray:
    """Q(W2) [K, N] on the int4/NF4/int8 grid of `quantize` (absmax scales unless given)."""
    w = jnp.asarray(w2, jnp.float32)
    s = Q.group_scales(w, method, group_size) if scale is None else jnp.asarray(scale, jnp.float32)
    return np.asarray(Q.decode(Q.encode(w, s, method), s, method), np.float64)


def output_error(delta: np.ndarray, hessian: np.ndarray) -> float:
    """||X D||_F^2 = trace(D^T H D) for D [K, N], H = X^T X [K, K]."""
    return float(np.sum((hessian @ delta) * delta))


def scale_candidates(act_mean: np.ndarray, grid: int = GRID) -> list[tuple[float, np.ndarray]]:
    """[(alpha, s [K])] of the paper's grid for mean input magnitudes a [K]."""
    a = np.maximum(np.asarray(act_mean, np.float64), 1e-8)
    out = []
    for i in range(grid):
        alpha = i / grid
        s = np.maximum(a ** alpha, 1e-4)
        out.append((alpha, s / np.sqrt(s.max() * s.min())))
    return out


def search_scale(weights: list[np.ndarray], hessian: np.ndarray, act_mean: np.ndarray,
                 method: str, group_size: int, grid: int = GRID
                 ) -> tuple[np.ndarray, float, list[float]]:
    """(s [K], best alpha, err per alpha) for W2s [K, N_i] that share the input X (H = X^T X)."""
    errs, best = [], None
    for alpha, s in scale_candidates(act_mean, grid):
        err = 0.0
        for w2 in weights:
            wq = rtn_2d(w2 * s[:, None], method, group_size) / s[:, None]
            err += output_error(w2 - wq, hessian)
        errs.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errs


def clip_scales(w2: np.ndarray, hessian: np.ndarray, method: str, group_size: int,
                ratios=CLIP_RATIOS) -> np.ndarray:
    """Group scales [K/g, N] of W2 [K, N] after the per-(group, channel) clip search."""
    k, n = w2.shape
    g = k if method == "int8" else group_size
    peak = {"int8": Q.INT8_MAX, "int4": Q.INT4_MAX, "nf4": 1.0}[method]
    amax = np.max(np.abs(w2).reshape(k // g, g, n), axis=1)  # [K/g, N]
    blocks = np.stack([hessian[i:i + g, i:i + g] for i in range(0, k, g)])  # [K/g, g, g]
    best_err = np.full(amax.shape, np.inf)
    best = np.where(amax > 0, amax / peak, 1.0)
    for r in ratios:
        scale = np.where(amax > 0, amax * r / peak, 1.0)
        d = (w2 - rtn_2d(w2, method, g, scale)).reshape(k // g, g, n)
        err = np.einsum("bgn,bgh,bhn->bn", d, blocks, d)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, scale, best)
    return best


# ----------------------------------------------------------------------------- whole models

def _get(params: dict, path: str):
    node = params
    for p in path.split("/"):
        node = node[p]
    return node


def _set(params: dict, path: str, value) -> None:
    *head, last = path.split("/")
    node = params
    for p in head:
        node = node[p]
    node[last] = value


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def layer_names(params: dict) -> list[str]:
    return sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))


def scale_groups(params: dict, layer: str) -> list[dict]:
    """The AWQ groups of one block: [{name, inputs (the Gram key of the shared input), weights
    (paths scaled by s on their rows), prev (path, "norm"|"cols") the 1/s is folded into}]."""
    attn, mlp = f"{layer}/attn", f"{layer}/mlp"
    groups = [
        {"name": f"{layer}/qkv", "inputs": f"{attn}/q/kernel",
         "weights": [f"{attn}/{m}/kernel" for m in ("q", "k", "v")],
         "prev": (f"{layer}/attn_norm", "norm")},
        {"name": f"{layer}/o", "inputs": f"{attn}/o/kernel", "weights": [f"{attn}/o/kernel"],
         "prev": (f"{attn}/v/kernel", "cols")},
        {"name": f"{layer}/mlp_in", "inputs": f"{mlp}/wi/kernel",
         "weights": [f"{mlp}/wi/kernel"] + ([f"{mlp}/wg/kernel"] if "wg" in _get(params, mlp)
                                            else []),
         "prev": (f"{layer}/mlp_norm", "norm")},
    ]
    if "wg" in _get(params, mlp):  # silu(x wg) * (x wi) is linear in wi's columns
        groups.append({"name": f"{layer}/mlp_out", "inputs": f"{mlp}/wo/kernel",
                       "weights": [f"{mlp}/wo/kernel"], "prev": (f"{mlp}/wi/kernel", "cols")})
    return groups


def _gqa_tie(params: dict, layer: str, act: np.ndarray) -> np.ndarray:
    """o's input statistic [H * hd] averaged over the query heads that share a kv head, so its
    factor can be folded into v's columns [KV * hd]."""
    heads, hd, _ = _get(params, f"{layer}/attn/o/kernel").shape
    kv = _get(params, f"{layer}/attn/v/kernel").shape[1]
    a = act.reshape(kv, heads // kv, hd).mean(axis=1, keepdims=True)
    return np.broadcast_to(a, (kv, heads // kv, hd)).reshape(-1)


def fold_scales(params: dict, logical_axes: dict, scales: dict[str, np.ndarray]) -> dict:
    """Float params with each group's s folded in (the model's output is unchanged up to
    rounding). scales: {group name: s [K]} for groups of `scale_groups`."""
    out = _copy(params)
    flat_axes = {"/".join(Q._path_names(p)): a for p, a in jax.tree_util.tree_flatten_with_path(
        logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    for layer in layer_names(params):
        for grp in scale_groups(params, layer):
            if grp["name"] not in scales:
                continue
            s = np.asarray(scales[grp["name"]], np.float64)
            for path in grp["weights"]:
                w = _get(out, path)
                dims = Q.contraction_dims(path.split("/"), flat_axes[path])
                w2 = np.asarray(Q.to_2d(w, dims), np.float64) * s[:, None]
                _set(out, path, Q.from_2d(jnp.asarray(w2, w.dtype), w.shape, dims))
            prev, kind = grp["prev"]
            if kind == "norm":
                for leaf in ("scale", "bias"):
                    if leaf in _get(out, prev):
                        p = _get(out, f"{prev}/{leaf}")
                        _set(out, f"{prev}/{leaf}", jnp.asarray(np.asarray(p, np.float64) / s,
                                                                p.dtype))
            else:  # the producer's output columns
                w = _get(out, prev)
                if grp["name"].endswith("/o"):  # s [H*hd] tied per kv channel -> [KV*hd]
                    heads, hd, _ = _get(out, grp["weights"][0]).shape
                    kv = w.shape[1]
                    s = s.reshape(kv, heads // kv, hd)[:, 0].reshape(-1)
                w2 = np.asarray(w, np.float64).reshape(w.shape[0], -1) / s[None, :]
                _set(out, prev, jnp.asarray(w2.reshape(w.shape), w.dtype))
    return out


def awq_params(params: dict, logical_axes: dict, grams: dict[str, np.ndarray],
               act_means: dict[str, np.ndarray], *, method: str = "int4", group_size: int = 128,
               clip: bool = True, embedding_method: str | None = None, grid: int = GRID
               ) -> tuple[dict, dict]:
    """(params with QArray leaves, {group: alpha}) -- AWQ-scaled, optionally clipped, then
    quantized with `method` / group_size; the norms keep their folded float scales.

    grams / act_means: `calibrate.input_statistics` of the float model. Raises ConfigError
    for a bad group size or when the statistics lack a layer."""
    if method not in Q.METHODS:
        raise ConfigError(f"awq method={method!r} is not one of {', '.join(Q.METHODS)}.")
    Q.check_params(params, logical_axes, method, group_size, embedding_method)
    scales, alphas, hess_scaled = {}, {}, {}
    for layer in layer_names(params):
        for grp in scale_groups(params, layer):
            key = grp["inputs"]
            if key not in grams or key not in act_means:
                raise ConfigError(f"AWQ: no calibration statistics for {key}; the calibration "
                                  "pass must cover every layer.")
            act = act_means[key]
            if grp["name"].endswith("/o"):
                act = _gqa_tie(params, layer, act)
            ws = []
            for path in grp["weights"]:
                w = _get(params, path)
                dims = Q.contraction_dims(path.split("/"), _axes(logical_axes, path))
                ws.append(np.asarray(Q.to_2d(w, dims), np.float64))
            k = ws[0].shape[0]
            g = Q.check_group_size(method, k, group_size, grp["weights"][0])
            s, alpha, _ = search_scale(ws, grams[key], act, method, g, grid)
            scales[grp["name"]], alphas[grp["name"]] = s, alpha
            for path in grp["weights"]:  # the Hessian of the scaled input x / s
                hess_scaled[path] = grams[key] / np.outer(s, s)
    folded = fold_scales(params, logical_axes, scales)
    overrides = {}
    if clip:
        for path, h in hess_scaled.items():
            if path.split("/")[-2] in ("q", "k"):
                continue
            w = _get(folded, path)
            dims = Q.contraction_dims(path.split("/"), _axes(logical_axes, path))
            w2 = np.asarray(Q.to_2d(w, dims), np.float64)
            g = Q.check_group_size(method, w2.shape[0], group_size, path)
            scale = clip_scales(w2, h, method, g)
            overrides[path] = Q.quantize(w, dims, method, g, name=path,
                                         scale=jnp.asarray(scale, jnp.float32))
    qparams = Q.quantize_params(folded, logical_axes, method=method, group_size=group_size,
                                embedding_method=embedding_method, overrides=overrides)
    return qparams, alphas


def _axes(logical_axes: dict, path: str) -> tuple:
    return _get(logical_axes, path)

