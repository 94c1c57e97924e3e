"""Pruning masks: magnitude (unstructured, per layer), Wanda (Sun et al. 2023) and N:M (2:4).

Every matmul weight `quantize.contraction_dims` names (q, k, v, o, MLP; the embedding table only
with include_embedding) is viewed as W2 [K, N] (contraction first, `quantize.to_2d`):

    magnitude: score |W|; the lowest round(sparsity * K * N) scores of the layer are zeroed.
    wanda:     score |W2[k, n]| * ||X[:, k]||_2 over calibration inputs X [T, K]; compared within
               each output channel n (the paper's per-output grouping): the lowest
               round(sparsity * K) of each column are zeroed.
    2:4:       in every run of 4 consecutive contraction rows of each column, the 2 lowest
               scores (Wanda's, or |W| without calibration) are zeroed: exactly 50%.

`scope` overrides where scores compete ("layer": the whole matrix; "output": each output channel
n), for the paper's ablations (magnitude per output, Wanda per layer). `sequential_masks` is the
paper's sequential variant: block i is calibrated on the inputs of the model whose blocks < i
are already pruned.

A mask is a bool array of the weight's shape (True = kept); `apply_masks` multiplies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llm.compress import quantize as Q
from llm.config import ConfigError

METHODS = ("magnitude", "wanda", "2:4")


def check_sparsity(sparsity: float) -> float:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise ConfigError(f"sparsity={sparsity!r} is outside [0, 1); give the fraction of "
                          "weights to remove, e.g. 0.5.")
    return float(sparsity)


def _lowest_mask(scores: np.ndarray, count: int, axis: int | None) -> np.ndarray:
    """True everywhere except the `count` lowest scores (over all, or along `axis`)."""
    if count <= 0:
        return np.ones(scores.shape, bool)
    if axis is None:
        flat = scores.reshape(-1)
        order = np.argsort(flat, kind="stable")[:count]
        mask = np.ones(flat.shape, bool)
        mask[order] = False
        return mask.reshape(scores.shape)
    order = np.argsort(scores, axis=axis, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[axis]).reshape(
        [-1 if d == axis else 1 for d in range(scores.ndim)]), axis=axis)
    return ranks >= count


def wanda_scores(w2: np.ndarray, input_norms: np.ndarray) -> np.ndarray:
    """|W2[k, n]| * ||X[:, k]||_2: W2 [K, N], input_norms [K] -> [K, N]."""
    return np.abs(w2) * np.asarray(input_norms)[:, None]


def _scoped_mask(scores: np.ndarray, sparsity: float, scope: str) -> np.ndarray:
    if scope == "layer":
        return _lowest_mask(scores, round(sparsity * scores.size), axis=None)
    if scope == "output":
        return _lowest_mask(scores, round(sparsity * scores.shape[0]), axis=0)
    raise ConfigError(f"prune scope={scope!r} is not 'layer' or 'output'.")


def mask_2d(w2: np.ndarray, method: str, sparsity: float,
            input_norms: np.ndarray | None = None, n: int = 2, m: int = 4,
            scope: str | None = None) -> np.ndarray:
    """Keep-mask [K, N] of W2 [K, N]. input_norms [K] (wanda, and 2:4 when given). scope:
    None = the method's own ("layer" for magnitude, "output" for wanda)."""
    if method == "magnitude":
        return _scoped_mask(np.abs(w2), sparsity, scope or "layer")
    if method == "wanda":
        if input_norms is None:
            raise ConfigError("prune method 'wanda' needs calibration inputs; give "
                              "calibration_batches >= 1.")
        return _scoped_mask(wanda_scores(w2, input_norms), sparsity, scope or "output")
    if method == "2:4":
        k, cols = w2.shape
        if k % m:
            raise ConfigError(f"2:4 pruning needs the contraction dimension to be a multiple of "
                              f"{m}, but it is {k}.")
        scores = np.abs(w2) if input_norms is None else wanda_scores(w2, input_norms)
        blocks = scores.reshape(k // m, m, cols)
        return _lowest_mask(blocks, n, axis=1).reshape(k, cols)
    raise ConfigError(f"prune method={method!r} is not one of {', '.join(METHODS)}.")


def prunable(params: dict, logical_axes: dict, include_embedding: bool = False
             ) -> dict[str, tuple[int, ...]]:
    """{path: contraction dims} of the weights that are pruned."""
    out = {}
    flat_axes = {Q._path_names(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = Q._path_names(path)
        dims = Q.contraction_dims(names, flat_axes[names])
        if dims is None or (names[-1] == "embedding" and not include_embedding):
            continue
        out["/".join(names)] = dims
    return out


def compute_masks(params: dict, logical_axes: dict, method: str, sparsity: float = 0.5,
                  grams: dict[str, np.ndarray] | None = None,
                  include_embedding: bool = False, scope: str | None = None,
                  only: str | None = None) -> dict[str, np.ndarray]:
    """{path: keep-mask in the weight's shape} for every prunable weight.

    grams: `calibrate.gram_matrices` output (wanda; optional for 2:4). Raises ConfigError for a
    sparsity outside [0, 1) or an unknown method. scope: see `mask_2d`. only: a path prefix
    (e.g. "layer_1/") -- mask just those weights."""
    if method not in METHODS:
        raise ConfigError(f"prune method={method!r} is not one of {', '.join(METHODS)}.")
    sparsity = 0.5 if method == "2:4" else check_sparsity(sparsity)
    flat = {"/".join(Q._path_names(p)): w
            for p, w in jax.tree_util.tree_flatten_with_path(params)[0]}
    masks = {}
    for key, dims in prunable(params, logical_axes, include_embedding).items():
        if only is not None and not key.startswith(only):
            continue
        w = flat[key]
        w2 = np.asarray(Q.to_2d(w, dims), np.float64)
        norms = None
        if grams is not None and key in grams:
            norms = np.sqrt(np.maximum(np.diag(grams[key]), 0.0))
        keep2 = mask_2d(w2, method, sparsity, norms, scope=scope)
        masks[key] = np.asarray(Q.from_2d(jnp.asarray(keep2), w.shape, dims))
    return masks


def sequential_masks(graphdef, params: dict, logical_axes: dict, method: str,
                     sparsity: float, batches: list[dict], scope: str | None = None
                     ) -> dict[str, np.ndarray]:
    """Masks computed block by block (Wanda's and SparseGPT's reference order): the statistics
    of block i come from a calibration pass of the model whose blocks 0..i-1 are already
    pruned. The tied embedding/output matrix is not pruned (as in `compute_masks`)."""
    from llm.compress import calibrate

    layers = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
    masks: dict[str, np.ndarray] = {}
    for layer in layers:
        grams, _ = calibrate.gram_matrices(graphdef, apply_masks(params, masks), batches)
        masks.update(compute_masks(params, logical_axes, method, sparsity, grams, scope=scope,
                                   only=f"{layer}/"))
    return masks


def apply_masks(params: dict, masks: dict) -> dict:
    """params with every masked weight multiplied by its mask (works under jit)."""

    def one(path, w):
        key = "/".join(Q._path_names(path))
        return w * jnp.asarray(masks[key], w.dtype) if key in masks else w

    return jax.tree_util.tree_map_with_path(one, params)


def count_nonzero(params: dict) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a float params dict."""
    leaves = jax.tree.leaves(params)
    total = sum(math.prod(x.shape) for x in leaves)
    nonzero = sum(int(np.count_nonzero(np.asarray(x))) for x in leaves)
    return total, nonzero
