"""Weight-only quantization: int8 per-channel, int4 / NF4 group-wise (two codes per byte).

A quantized weight is a `QArray`, a pytree of the packed integer codes and their float scales
plus static metadata (method, original shape, which dimensions are the contraction). Every
weight is first brought to a canonical 2-D layout

    W2 [K, N] = W transposed so its contraction dims come first, flattened

(K = product of the contraction dims, the dims a matmul sums over; N = the rest, the output
channels). Then, with symmetric scales (no zero point):

    int8: codes [K, N] int8 in [-127, 127];  scale [1, N]       = max_k |W2[:, n]| / 127
    int4: codes [K/2, N] uint8, two per byte; scale [K/g, N]   = max over a group of g rows / 7
    nf4:  codes [K/2, N] uint8, two per byte; scale [K/g, N]   = absmax of the group; a code
          indexes the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023), in [-1, 1]

An int4 code c in [-8, 7] is stored as the nibble c + 8; row 2i of W2 goes to the low nibble of
packed row i and row 2i+1 to the high nibble. `dequantize` inverts all of it and returns the
weight in its original shape, so a quantized model runs by dequantizing its params inside the
jitted forward (`dequantize_params`), with XLA fusing the unpack into the matmul's operand.

Which dims are the contraction comes from the weight's logical axis names (`contraction_dims`),
the same names that shard it: a weight that reads the residual stream ([embed, ...]) contracts
embed; one that writes it ([..., embed]: attention out, MLP down) contracts everything before
embed; the embedding table [vocab, embed] contracts embed, as the tied output layer does.
Norm scales, biases and learned position tables stay in float.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ConfigError

METHODS = ("int8", "int4", "nf4")

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023; the values bitsandbytes ships): quantiles of
# N(0, 1) rescaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

INT8_MAX = 127.0
INT4_MAX = 7.0


@flax.struct.dataclass
class QArray:
    """A quantized weight (a pytree: `codes` and `scale` are leaves, the rest is static).

    codes: int8 [K, N] (int8) or uint8 [K/2, N] (int4, nf4: two codes per byte).
    scale: float32 [1, N] (int8) or [K/group_size, N] (int4, nf4).
    method: "int8" | "int4" | "nf4". shape: the weight's original shape. contraction: the
    original dims summed over by the matmul (they lead W2). group_size: rows per scale (K for
    int8). dtype: the float dtype `dequantize` returns by default (the weight's own).
    activations: "float" (weight-only: the matmul runs on the dequantized weight) or "int8"
    (W8A8, int8 weights only: `matmul_2d` quantizes each token's activations to int8 and runs
    an int8 x int8 -> int32 dot; `llm.model.layers.Dense` and `Embed.attend` call it).
    """

    codes: jax.Array
    scale: jax.Array
    method: str = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    contraction: tuple[int, ...] = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    activations: str = flax.struct.field(pytree_node=False, default="float")

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes + scales)."""
        return int(self.codes.size * self.codes.dtype.itemsize
                   + self.scale.size * self.scale.dtype.itemsize)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def matmul_2d(self, x2: jax.Array) -> jax.Array:
        """x2 [T, K] . W2 [K, N] -> float32 [T, N]. W8A8: per-token symmetric activation scales
        a_t = max_k |x2[t, k]| / 127, codes round(x2 / a_t) in int8, one int8 dot with int32
        accumulation, then y = acc * a_t * scale_n. Otherwise the dequantized weight's dot."""
        if self.activations != "int8":
            return jnp.dot(x2, decode(unpacked_codes(self), self.scale, self.method))
        x2 = x2.astype(jnp.float32)
        amax = jnp.max(jnp.abs(x2), axis=1, keepdims=True)
        a = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
        xq = jnp.clip(jnp.round(x2 / a), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        acc = jax.lax.dot_general(xq, self.codes, (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * a * self.scale

    def __getitem__(self, index):
        """`param[...]`, the way every layer reads its weight (`self.kernel[...]`), dequantizes:
        a params dict with QArray leaves runs unchanged through `transformer.apply`, the KV-cache
        sampler and the evaluator, the unpack fused into the jitted forward."""
        return dequantize(self)[index]


def _permutation(ndim: int, contraction: Sequence[int]) -> tuple[int, ...]:
    contraction = tuple(d % ndim for d in contraction)
    return contraction + tuple(d for d in range(ndim) if d not in contraction)


def to_2d(w: jax.Array, contraction: Sequence[int]) -> jax.Array:
    """w [...] -> W2 [K, N]: contraction dims first, flattened."""
    perm = _permutation(w.ndim, contraction)
    k = math.prod(w.shape[d] for d in perm[:len(contraction)])
    return jnp.transpose(w, perm).reshape(k, -1)


def from_2d(w2: jax.Array, shape: Sequence[int], contraction: Sequence[int]) -> jax.Array:
    """Inverse of `to_2d`: W2 [K, N] -> the original shape."""
    perm = _permutation(len(shape), contraction)
    return jnp.transpose(w2.reshape([shape[d] for d in perm]), np.argsort(perm))


def check_group_size(method: str, k: int, group_size: int, name: str = "weight") -> int:
    """The group size used for a contraction of size k (k itself for int8). Raises ConfigError
    when group_size does not divide k or is odd (int4/nf4 pack two rows per byte)."""
    if method not in METHODS:
        raise ConfigError(f"quantize method={method!r} is not one of {', '.join(METHODS)}.")
    if method == "int8":
        return k
    if group_size <= 0 or group_size % 2:
        raise ConfigError(f"quantize.group_size={group_size} must be a positive even number "
                          "(int4 packs two rows per byte); use e.g. 32, 64 or 128.")
    if k % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if k % g == 0]
        raise ConfigError(f"quantize.group_size={group_size} does not divide the contraction "
                          f"dimension {k} of {name}; use a divisor of {k} "
                          f"(e.g. {', '.join(map(str, divisors)) or 'an even divisor'}).")
    return group_size


def pack_int4(nibbles: jax.Array) -> jax.Array:
    """uint8 [K, N] with values in [0, 15] (K even) -> uint8 [K/2, N]: row 2i in the low nibble,
    row 2i+1 in the high nibble."""
    nibbles = nibbles.astype(jnp.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 [K/2, N] -> uint8 [K, N] in [0, 15] (exact inverse of `pack_int4`)."""
    lo, hi = packed & 0x0F, packed >> 4
    return jnp.stack([lo, hi], axis=1).reshape(-1, packed.shape[-1])


def group_scales(w2: jax.Array, method: str, group_size: int) -> jax.Array:
    """Symmetric scales of W2 [K, N]: [1, N] for int8, [K/group_size, N] for int4/nf4."""
    k, n = w2.shape
    g = k if method == "int8" else group_size
    amax = jnp.max(jnp.abs(w2.astype(jnp.float32)).reshape(k // g, g, n), axis=1)
    peak = {"int8": INT8_MAX, "int4": INT4_MAX, "nf4": 1.0}[method]
    return jnp.where(amax > 0, amax / peak, 1.0)


def encode(w2: jax.Array, scale: jax.Array, method: str) -> jax.Array:
    """Unpacked codes of W2 [K, N] for `scale` [K/g, N]: int8 in [-127, 127] (int8), uint8 in
    [0, 15] (int4: c + 8; nf4: the index of the nearest NF4 level)."""
    k, n = w2.shape
    s = jnp.repeat(scale, k // scale.shape[0], axis=0)
    x = w2.astype(jnp.float32) / s
    if method == "int8":
        return jnp.clip(jnp.round(x), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    if method == "int4":
        return (jnp.clip(jnp.round(x), -8, INT4_MAX) + 8).astype(jnp.uint8)
    levels = jnp.asarray(NF4_LEVELS)
    return jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1).astype(jnp.uint8)


def decode(codes: jax.Array, scale: jax.Array, method: str) -> jax.Array:
    """Unpacked codes [K, N] and scale [K/g, N] -> float32 W2 [K, N]."""
    k = codes.shape[0]
    s = jnp.repeat(scale, k // scale.shape[0], axis=0)
    if method == "int8":
        return codes.astype(jnp.float32) * s
    if method == "int4":
        return (codes.astype(jnp.float32) - 8.0) * s
    return jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)] * s


def quantize(w: jax.Array, contraction: Sequence[int], method: str = "int8",
             group_size: int = 128, name: str = "weight", *,
             scale: jax.Array | None = None, w2: jax.Array | None = None) -> QArray:
    """Quantize w (any shape) over its `contraction` dims (see module docstring for layouts).

    scale / w2: optional precomputed scales [K/g, N] and an already adjusted W2 [K, N] (GPTQ
    passes both); by default both come from w. Raises ConfigError for a bad method or group.
    """
    contraction = tuple(d % w.ndim for d in contraction)
    k = math.prod(w.shape[d] for d in contraction)
    g = check_group_size(method, k, group_size, name)
    if w2 is None:
        w2 = to_2d(w, contraction)
    if scale is None:
        scale = group_scales(w2, method, g)
    codes = encode(w2, scale, method)
    if method != "int8":
        codes = pack_int4(codes)
    return QArray(codes=codes, scale=scale.astype(jnp.float32), method=method,
                  shape=tuple(w.shape), contraction=contraction, group_size=g,
                  dtype=jnp.dtype(w.dtype).name)


def unpacked_codes(q: QArray) -> jax.Array:
    """The codes [K, N] of q, unpacked (int8, or uint8 in [0, 15])."""
    return q.codes if q.method == "int8" else unpack_int4(q.codes)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """QArray -> the weight in its original shape and dtype (or `dtype`)."""
    w2 = decode(unpacked_codes(q), q.scale, q.method)
    return from_2d(w2, q.shape, q.contraction).astype(dtype or q.dtype)


# ----------------------------------------------------------------------------- whole models

def contraction_dims(path: Sequence[str], axes: Sequence[str | None]) -> tuple[int, ...] | None:
    """The contraction dims of the parameter at `path` with logical `axes`, or None when the
    parameter stays in float (norm scales, biases, position tables, anything 1-D).

    [embed, ...] (q/k/v, MLP up/gate, untied lm_head) -> (0,); [..., embed] with a non-embed
    first axis (attention out [heads, head_dim, embed], MLP down [mlp, embed]) -> all but the
    last; the embedding table [vocab, embed] -> (1,) (what the tied output layer contracts).
    """
    leaf = path[-1] if path else ""
    axes = tuple(axes)
    if len(axes) < 2:
        return None
    if leaf == "embedding":
        return (1,) if axes == ("vocab", "embed") else None
    if leaf != "kernel":
        return None
    if axes[0] == "embed":
        return (0,)
    if axes[-1] == "embed":
        return tuple(range(len(axes) - 1))
    return None


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


@gin.configurable
def quantize_params(params: dict, logical_axes: dict, method: str = "int8",
                    group_size: int = 128, embedding_method: str | None = None,
                    overrides: dict | None = None) -> dict:
    """Quantize every matmul weight of a params dict (gin: quantize_params.*).

    params / logical_axes: the nested dicts of `transformer.init` / `transformer.abstract`.
    method, group_size: for all matmul weights. embedding_method: a different method for the
    embedding table (e.g. "int8" under int4, as llama.cpp's Q4_K_M keeps its output tensor at
    higher precision); None = method. overrides: {path "a/b/kernel": QArray} precomputed
    (e.g. by GPTQ) used as they are. Returns the same dict with QArray leaves where quantized.
    """
    overrides = overrides or {}
    flat_axes = {_path_names(p): a for p, a in
                 jax.tree_util.tree_flatten_with_path(
                     logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}

    def one(path, w):
        names = _path_names(path)
        key = "/".join(names)
        if key in overrides:
            return overrides[key]
        dims = contraction_dims(names, flat_axes[names])
        if dims is None:
            return w
        m = embedding_method if (names[-1] == "embedding" and embedding_method) else method
        return quantize(w, dims, m, group_size, name=key)

    return jax.tree_util.tree_map_with_path(one, params)


def check_params(abstract_params: dict, logical_axes: dict, method: str, group_size: int,
                 embedding_method: str | None = None) -> None:
    """Raise ConfigError unless `method` / group_size fit every weight quantize_params would
    quantize (params or ShapeDtypeStructs)."""
    flat_axes = {_path_names(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    for path, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        names = _path_names(path)
        dims = contraction_dims(names, flat_axes[names])
        if dims is None:
            continue
        m = embedding_method if (names[-1] == "embedding" and embedding_method) else method
        check_group_size(m, math.prod(a.shape[d] for d in dims), group_size, "/".join(names))


def int8_activations(qparams: dict) -> dict:
    """W8A8: every int8 QArray of a `quantize_params(..., method="int8")` dict also quantizes
    its input activations per token (`QArray.matmul_2d`). Raises ConfigError for other codes."""

    def one(q):
        if not is_qarray(q):
            return q
        if q.method != "int8":
            raise ConfigError(f"W8A8 needs int8 weights, but a weight is {q.method}; quantize "
                              "with method='int8' first.")
        return q.replace(activations="int8")

    return jax.tree.map(one, qparams, is_leaf=is_qarray)


def dequantize_params(qparams: dict, dtype=None) -> dict:
    """Every QArray leaf back to a float array (call inside the jitted forward)."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_qarray(x) else x, qparams,
                        is_leaf=is_qarray)


def param_bytes(params: dict) -> int:
    """Stored bytes of a params dict, QArrays counted as codes + scales."""
    leaves = jax.tree.leaves(params, is_leaf=is_qarray)
    return int(sum(x.nbytes if is_qarray(x) else x.size * x.dtype.itemsize for x in leaves))


# ----------------------------------------------------------------------------- QAT

def fake_quantize(w: jax.Array, contraction: Sequence[int], method: str = "int8",
                  group_size: int = 128) -> jax.Array:
    """Quantize-dequantize w with a straight-through estimator: the forward value is
    dequantize(quantize(w)), the gradient is the identity where w lies inside the quantizer's
    range and zero where it is clipped (`ste_quantize_2d`). With absmax scales (held constant
    in the backward) every weight is in range, so the gradient is the identity."""
    contraction = tuple(d % w.ndim for d in contraction)
    k = math.prod(w.shape[d] for d in contraction)
    g = check_group_size(method, k, group_size)
    w2 = to_2d(w, contraction)
    scale = jax.lax.stop_gradient(group_scales(w2, method, g))
    return from_2d(ste_quantize_2d(w2, scale, method), w.shape, contraction).astype(w.dtype)


def ste_quantize_2d(w2: jax.Array, scale: jax.Array, method: str) -> jax.Array:
    """decode(encode(w2)) forward; straight-through gradient: 1 where w2 / scale rounds to a code
    without clipping (int: within [lo - 1/2, hi + 1/2]; nf4: within [-1, 1] up to float
    rounding), 0 where it is clipped."""
    k = w2.shape[0]
    s = jnp.repeat(scale, k // scale.shape[0], axis=0)
    lo, hi = {"int8": (-INT8_MAX - 0.5, INT8_MAX + 0.5), "int4": (-8.5, INT4_MAX + 0.5),
              "nf4": (-1.0 - 1e-6, 1.0 + 1e-6)}[method]
    x = w2.astype(jnp.float32)
    r = x / s
    inside = (r >= lo) & (r <= hi)
    q = decode(encode(x, scale, method), scale, method)
    return jnp.where(inside, x + jax.lax.stop_gradient(q - x), jax.lax.stop_gradient(q))


def fake_quantize_params(params: dict, logical_axes: dict, method: str = "int8",
                         group_size: int = 128, embedding_method: str | None = None) -> dict:
    """`fake_quantize` on every weight `quantize_params` would quantize (for QAT: apply to the
    params inside the loss, train the float params)."""
    flat_axes = {_path_names(p): a for p, a in
                 jax.tree_util.tree_flatten_with_path(
                     logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}

    def one(path, w):
        names = _path_names(path)
        dims = contraction_dims(names, flat_axes[names])
        if dims is None:
            return w
        m = embedding_method if (names[-1] == "embedding" and embedding_method) else method
        return fake_quantize(w, dims, m, group_size)

    return jax.tree_util.tree_map_with_path(one, params)


# ----------------------------------------------------------------------------- storage

def to_storage(qparams: dict) -> tuple[dict, dict]:
    """(arrays, meta): a plain nested dict of arrays for orbax (a QArray becomes
    {"codes", "scale"}) and a JSON-able {path: {method, shape, contraction, group_size, dtype}}."""
    meta = {}

    def one(path, x):
        if not is_qarray(x):
            return x
        meta["/".join(_path_names(path))] = {
            "method": x.method, "shape": list(x.shape), "contraction": list(x.contraction),
            "group_size": x.group_size, "dtype": x.dtype, "activations": x.activations}
        return {"codes": x.codes, "scale": x.scale}

    arrays = jax.tree_util.tree_map_with_path(one, qparams, is_leaf=is_qarray)
    return arrays, meta


def from_storage(arrays: dict, meta: dict) -> dict:
    """Inverse of `to_storage`."""

    def walk(node, prefix):
        if isinstance(node, dict):
            key = "/".join(prefix)
            if key in meta and set(node) == {"codes", "scale"}:
                m = meta[key]
                return QArray(codes=jnp.asarray(node["codes"]), scale=jnp.asarray(node["scale"]),
                              method=m["method"], shape=tuple(m["shape"]),
                              contraction=tuple(m["contraction"]), group_size=m["group_size"],
                              dtype=m["dtype"], activations=m.get("activations", "float"))
            return {k: walk(v, (*prefix, k)) for k, v in node.items()}
        return node

    return walk(arrays, ())


def storage_target(abstract_params: dict, meta: dict) -> dict:
    """ShapeDtypeStructs of `to_storage(quantize_params(...))[0]` from the float model's abstract
    params and the stored meta (the restore target of a quantized checkpoint)."""

    def one(path, a):
        key = "/".join(_path_names(path))
        if key not in meta:
            return a
        m = meta[key]
        contraction = tuple(m["contraction"])
        k = math.prod(m["shape"][d] for d in contraction)
        n = math.prod(m["shape"]) // k
        rows = k if m["method"] == "int8" else k // 2
        code_dtype = jnp.int8 if m["method"] == "int8" else jnp.uint8
        return {"codes": jax.ShapeDtypeStruct((rows, n), code_dtype),
                "scale": jax.ShapeDtypeStruct((k // m["group_size"], n), jnp.float32)}

    return jax.tree_util.tree_map_with_path(one, abstract_params)
