"""Decode attention: a few new query tokens against a KV cache with a per-sequence length.

q [batch, q_len, heads, head_dim] (q_len small: 1 for plain sampling, a few for speculative
decoding), caches [batch, max_len, kv_heads, head_dim], lengths [batch] int32. Query t of
sequence b sits at position lengths[b] - q_len + t and attends cache positions <= that.

Both kernels put all q heads that share a kv head (and all q_len tokens) into the rows of one
tile (tiles of block_rows rows when q_len is long, e.g. a prefill through the cache), so each
cache block is read from HBM once per kv head and row tile; a row tile stops at the last
position its rows may attend. Blocks wholly past lengths[b] (or past the cache, when a length
exceeds it) are never read; inside the last block, rows past the length are zeroed before
use, so stale cache contents (even NaN) cannot leak into the result. The cache block is legal
for the backend at every cache length (`cache_block`: multiples of 8 on TPU, powers of two on
GPU); a cache no such block divides is padded, with NaN, and the padding is never attended.
  GPU (Triton): grid (batch, kv_heads, row_tiles x num_splits). When all rows fit one tile
    (decoding), the cache is cut into num_splits chunks (flash-decoding); each program writes
    a partial softmax (output and base-2 logsumexp) and the chunks are merged with jnp ops.
  TPU (Mosaic): grid (batch, row_tiles, kv_blocks); lengths come in by scalar prefetch, blocks
    past the last attended position are neither fetched (index map clamps) nor computed. The
    cache is viewed as [batch, max_len, kv_heads * head_dim] (a free reshape) so blocks are
    lane-dense.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from llm.kernels.backend import resolve_backend, resolve_interpret
from llm.kernels.block_sizes import DecodeBlockSizes, next_power_of_2, round_up
from llm.kernels.blockwise import online_softmax_finish, online_softmax_init, online_softmax_step
from llm.kernels.reference import MASK_VALUE, allowed

LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))
_LANES = 128


def _rows_per_kv_head(q: jax.Array, kv_heads: int, rows: int) -> jax.Array:
    """[b, T, heads, d] -> [b, kv_heads, rows, d]; row r = t * groups + g, zero-padded."""
    b, t, heads, d = q.shape
    groups = heads // kv_heads
    x = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 1, 3, 4).reshape(
        b, kv_heads, t * groups, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows - t * groups), (0, 0)))


def _from_rows(o: jax.Array, q_shape) -> jax.Array:
    b, t, heads, d = q_shape
    kv_heads = o.shape[1]
    groups = heads // kv_heads
    o = o[:, :, :t * groups].reshape(b, kv_heads, t, groups, d).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, t, heads, d)


def _row_offsets(q_len: int, groups: int, rows: int) -> jax.Array:
    """[rows] int32: t - q_len for row r = t * groups + g; padded rows see nothing."""
    r = jnp.arange(rows)
    return jnp.where(r < q_len * groups, r // groups - q_len, -(2**30)).astype(jnp.int32)


def cache_block(max_len: int, block: int, backend: str) -> tuple[int, int]:
    """(block_kv, padded_len): the cache block and the cache length padded to it.

    TPU (Mosaic) blocks are multiples of 8 positions (the sublane tile; a block is
    [block_kv, kv_heads * head_dim]); GPU (Triton) blocks powers of two >= 16. The block is
    at most `block` (and the cache rounded up to the granule); the largest legal block that
    divides the (rounded) cache is taken, so the common case needs no copy. A cache whose
    only legal divisors are small (under a quarter of `block`) is padded to a multiple of
    `block` instead. Padded positions are never attended: the kernels bound every read by
    the real cache length.
    """
    granule = 8 if backend == "tpu" else 16
    padded = round_up(max_len, granule)
    top = min(block, padded) if backend == "tpu" else min(block, next_power_of_2(padded))
    b = top
    while padded % b:
        b = b - granule if backend == "tpu" else b // 2
    if b * 4 < top:
        return top, round_up(max_len, top)
    return b, padded


def _pad_cache(cache: jax.Array, length: int) -> jax.Array:
    """Pad the cache's positions to `length` with NaN: the kernels never read past the real
    cache, and a read that did would show at once instead of biasing the softmax."""
    if cache.shape[1] == length:
        return cache
    return jnp.pad(cache, ((0, 0), (0, length - cache.shape[1]), (0, 0), (0, 0)),
                   constant_values=jnp.nan)


def _tiling(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, blocks: DecodeBlockSizes,
            backend: str):
    """(k_cache, v_cache padded to the block (`cache_block`), groups, block_rows, rows,
    block_kv). Rows (q_len x group heads) are tiled by block_rows: one tile for decoding, many
    for a prefill through the cache. Triton tiles are powers of two >= 16, Mosaic tiles
    multiples of 8."""
    q_len, heads = q.shape[1], q.shape[2]
    groups = heads // k_cache.shape[2]
    if backend == "gpu":
        block_rows = min(blocks.block_rows, max(16, next_power_of_2(q_len * groups)))
    else:
        block_rows = min(round_up(blocks.block_rows, 8), round_up(q_len * groups, 8))
    block_kv, padded_len = cache_block(k_cache.shape[1], blocks.block_kv, backend)
    return (_pad_cache(k_cache, padded_len), _pad_cache(v_cache, padded_len), groups,
            block_rows, round_up(q_len * groups, block_rows), block_kv)


def _cache_tile(s, v, first, length, limit, *, cache_len: int):
    """Mask one cache block: scores s [rows, block] of positions first.. against each row's
    last attendable position `limit` [rows, 1] (`allowed`, causal, bounded by the real cache
    length), and zero the value rows at or past min(length, cache_len) -- stale or padded
    cache rows may hold anything, even NaN, and 0 * NaN would leak. Returns (s, v)."""
    block = v.shape[0]
    k_pos = first + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(allowed(limit, k_pos, causal=True, kv_len=cache_len), s, MASK_VALUE)
    rows = first + lax.broadcasted_iota(jnp.int32, (block, v.shape[1]), 0)
    v = jnp.where(rows < jnp.minimum(length, cache_len), v, jnp.zeros_like(v))
    return s, v


# ---------------------------------------------------------------- GPU (Triton)

def _triton_kernel(len_ref, off_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale: float,
                   block_kv: int, blocks_per_split: int, splits: int, cache_len: int):
    b, s = pl.program_id(0), pl.program_id(2) % splits
    length = len_ref[b]
    q = q_ref[...]
    rows = q.shape[0]
    offsets = off_ref[...]
    limit = length + offsets  # [rows]: last cache position each row may attend
    lo = s * blocks_per_split
    # Never past the real cache (padding is not read), nor past the last position any row of
    # this tile may attend.
    hi = jnp.minimum(jnp.minimum(lo + blocks_per_split, -(-cache_len // block_kv)),
                     lax.div(length + jnp.max(offsets) + block_kv, block_kv))

    def step(j, carry):
        acc, m, l = carry
        kv_slice = pl.ds(j * block_kv, block_kv)
        sc = lax.dot_general(q, k_ref[kv_slice, :], _NT,
                             preferred_element_type=jnp.float32) * (sm_scale * LOG2E)
        sc, v = _cache_tile(sc, v_ref[kv_slice, :], j * block_kv, length, limit[:, None],
                            cache_len=cache_len)
        m, l, acc = online_softmax_step(m, l, acc, sc, v, exp=jnp.exp2)
        return acc, m, l

    m, l, acc = online_softmax_init((rows,), (rows, q.shape[1]))
    acc, m, l = lax.fori_loop(lo, hi, step, (acc, m, l))
    o_ref[...], lse_ref[...] = online_softmax_finish(m, l, acc, log=jnp.log2,
                                                     empty_lse=-jnp.inf)


def _decode_triton(q, k_cache, v_cache, lengths, *, sm_scale: float, blocks: DecodeBlockSizes,
                   interpret: bool):
    batch, q_len, _, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    # A cache that no legal block divides is padded (a copy: allocate multiples of 16).
    k_cache, v_cache, groups, block_rows, rows, block_kv = _tiling(q, k_cache, v_cache, blocks,
                                                                   "gpu")
    max_len = k_cache.shape[1]
    # Many row tiles (prefill) already fill the GPU: only a single tile is split.
    row_blocks = rows // block_rows
    n_blocks = max_len // block_kv
    splits = min(blocks.num_splits, n_blocks) if row_blocks == 1 else 1
    per = -(-n_blocks // splits)
    splits = -(-n_blocks // per)
    cache_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda b, h, t: (b, 0, h, 0))
    # Grid axis 2 enumerates (row tile, split) pairs: Triton grids have three axes.
    o_part, lse_part = pl.pallas_call(
        functools.partial(_triton_kernel, sm_scale=sm_scale, block_kv=block_kv,
                          blocks_per_split=per, splits=splits, cache_len=cache_len),
        grid=(batch, kv_heads, row_blocks * splits),
        in_specs=[pl.BlockSpec((batch,), lambda b, h, t: (0,)),
                  pl.BlockSpec((block_rows,), lambda b, h, t: (t // splits,)),
                  pl.BlockSpec((None, None, block_rows, head_dim),
                               lambda b, h, t: (b, h, t // splits, 0)),
                  cache_spec, cache_spec],
        out_specs=[pl.BlockSpec((None, None, None, block_rows, head_dim),
                                lambda b, h, t: (b, h, t % splits, t // splits, 0)),
                   pl.BlockSpec((None, None, None, block_rows),
                                lambda b, h, t: (b, h, t % splits, t // splits))],
        out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths, _row_offsets(q_len, groups, rows), _rows_per_kv_head(q, kv_heads, rows),
      k_cache, v_cache)
    # Merge the splits' partial softmaxes (base 2); splits that saw nothing have lse = -inf.
    lse_max = jnp.max(lse_part, axis=2, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp2(lse_part - lse_max)  # [b, kv_heads, splits, rows]
    denom = jnp.sum(w, axis=2)
    o = jnp.sum(w[..., None] * o_part, axis=2) / jnp.where(denom > 0, denom, 1.0)[..., None]
    return _from_rows(o, q.shape).astype(q.dtype)


# ---------------------------------------------------------------- TPU (Mosaic)

def _last_position(length, row_block, *, block_rows: int, q_len: int, groups: int,
                   cache_len: int):
    """Last cache position any row of row tile `row_block` may attend (scalar int32), never
    past the real cache."""
    t_max = jnp.minimum(((row_block + 1) * block_rows - 1) // groups, q_len - 1)
    return jnp.minimum(length - q_len + t_max, cache_len - 1)


def _mosaic_kernel(len_ref, off_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *,
                   sm_scale: float, block_kv: int, kv_heads: int, head_dim: int,
                   block_rows: int, q_len: int, groups: int, cache_len: int):
    b, r, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    last = _last_position(length, r, block_rows=block_rows, q_len=q_len, groups=groups,
                          cache_len=cache_len)

    @pl.when(j == 0)
    def _init():
        m_scr[...], l_scr[...], acc_scr[...] = online_softmax_init(m_scr.shape, acc_scr.shape)

    @pl.when(j * block_kv <= last)
    def _step():
        limit = length + off_ref[...][:, 0:1]  # [rows, 1]: last position each row attends
        for h in range(kv_heads):  # static: kv_heads is small, each head is a lane slice
            cols = slice(h * head_dim, (h + 1) * head_dim)
            s = lax.dot_general(q_ref[h], k_ref[:, cols], _NT,
                                preferred_element_type=jnp.float32) * sm_scale
            s, v = _cache_tile(s, v_ref[:, cols], j * block_kv, length, limit,
                               cache_len=cache_len)
            m_scr[h], l_scr[h], acc_scr[h] = online_softmax_step(m_scr[h], l_scr[h],
                                                                 acc_scr[h], s, v)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finalize():
        for h in range(kv_heads):
            o_ref[h] = online_softmax_finish(m_scr[h], l_scr[h], acc_scr[h])[0].astype(
                o_ref.dtype)


def _decode_mosaic(q, k_cache, v_cache, lengths, *, sm_scale: float, blocks: DecodeBlockSizes,
                   interpret: bool):
    batch, q_len, _, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    k_cache, v_cache, groups, block_rows, rows, block_kv = _tiling(q, k_cache, v_cache, blocks,
                                                                   "tpu")
    max_len = k_cache.shape[1]
    width = kv_heads * head_dim
    num_blocks = max_len // block_kv

    def cache_index(b, r, j, len_ref):  # past the last needed block: repeat it, no new DMA
        last = _last_position(len_ref[b], r, block_rows=block_rows, q_len=q_len, groups=groups,
                              cache_len=cache_len)
        return b, jnp.clip(jnp.minimum(j, lax.div(last, block_kv)), 0, num_blocks - 1), 0

    offsets = jnp.broadcast_to(_row_offsets(q_len, groups, rows)[:, None], (rows, _LANES))
    q_spec = pl.BlockSpec((None, kv_heads, block_rows, head_dim), lambda b, r, j, _: (b, 0, r, 0))
    out = pl.pallas_call(
        functools.partial(_mosaic_kernel, sm_scale=sm_scale, block_kv=block_kv,
                          kv_heads=kv_heads, head_dim=head_dim, block_rows=block_rows,
                          q_len=q_len, groups=groups, cache_len=cache_len),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, rows // block_rows, num_blocks),
            in_specs=[pl.BlockSpec((block_rows, _LANES), lambda b, r, j, _: (r, 0)),
                      q_spec,
                      pl.BlockSpec((None, block_kv, width), cache_index),
                      pl.BlockSpec((None, block_kv, width), cache_index)],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((kv_heads, block_rows, _LANES), jnp.float32),
                            pltpu.VMEM((kv_heads, block_rows, _LANES), jnp.float32),
                            pltpu.VMEM((kv_heads, block_rows, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="decode_attention",
    )(lengths, offsets, _rows_per_kv_head(q, kv_heads, rows),
      k_cache.reshape(batch, max_len, width), v_cache.reshape(batch, max_len, width))
    return _from_rows(out, q.shape)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     *, sm_scale: float | None = None,
                     block_sizes: DecodeBlockSizes | None = None, backend: str = "auto",
                     interpret: bool | None = None) -> jax.Array:
    """Attention of q_len new tokens per sequence against a ragged KV cache.

    Args:
      q: [batch, q_len, heads, head_dim], the last q_len tokens of each valid prefix; cast
        to the cache dtype for the matmuls, the result comes back in q's dtype.
      k_cache, v_cache: [batch, max_len, kv_heads, head_dim], heads % kv_heads == 0.
      lengths: [batch] int, valid cache length per sequence (including the new tokens).
        Query t attends positions <= lengths[b] - q_len + t; nothing at or past lengths[b]
        is read.
      sm_scale: default head_dim ** -0.5 (Python number).
      block_sizes: `DecodeBlockSizes` (cache block, number of splits, Triton warps).
      backend / interpret: as in `flash_attention`.
    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; same as `decode_attention_reference`.
    """
    backend = resolve_backend(backend)
    if q.ndim != 4 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [batch, q_len, heads, head_dim] and equal caches [batch, "
                         f"max_len, kv_heads, head_dim]; got q{q.shape} k_cache{k_cache.shape} "
                         f"v_cache{v_cache.shape}")
    batch, _, heads, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or heads % k_cache.shape[2]:
        raise ValueError(f"q{q.shape} does not fit the cache {k_cache.shape}: need equal batch "
                         "and head_dim, and heads a multiple of kv_heads")
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int [batch]=[{batch}], got {lengths.dtype}"
                         f"{list(lengths.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype; got {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if backend == "gpu" and (head_dim < 16 or head_dim & (head_dim - 1)):
        raise ValueError(f"head_dim={head_dim}: the GPU decode kernel needs a power of two >= 16")
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    if isinstance(sm_scale, jax.Array) or not isinstance(sm_scale, int | float):
        raise TypeError("sm_scale must be a Python float (it is baked into the kernel)")
    blocks = block_sizes or DecodeBlockSizes()
    blocks.validate()
    impl = _decode_triton if backend == "gpu" else _decode_mosaic
    # q is computed in the cache's dtype (bf16 caches with fp32 activations are common).
    out = impl(q.astype(k_cache.dtype), k_cache, v_cache, lengths.astype(jnp.int32),
               sm_scale=float(sm_scale), blocks=blocks,
               interpret=resolve_interpret(backend, interpret))
    return out.astype(q.dtype)
