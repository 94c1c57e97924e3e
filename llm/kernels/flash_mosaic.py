"""Flash attention for TPUs: Pallas kernels lowered through Mosaic.

Takes the model layout (q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
head_dim], lengths already padded to the blocks) and works internally in [batch, heads, len,
head_dim] so each block's last two dims are (positions, head_dim) as Mosaic's (8, 128) tiling
wants. Row statistics (logsumexp, delta), segment ids and prefix-LM flags are stored
lane-major ([batch, heads, 1, len] / [batch, 1, len]) so they cost 4 bytes per position in HBM.

Three pallas_calls, each with the reduction axis innermost ("arbitrary") and VMEM scratch
accumulators:
  forward  grid (batch, heads, q_blocks, kv_blocks)
  dQ       grid (batch, heads, q_blocks, kv_blocks)
  dK/dV    grid (batch, kv_heads, kv_blocks, groups * q_blocks); computed in the transposed
           orientation (keys on sublanes) so no in-kernel transposes of the big tiles.
A tile that is fully masked (above the causal diagonal unless both blocks hold prefix-LM
positions, past the valid length, or with segment-id ranges that cannot meet; per-block
summaries come in through scalar prefetch) is not computed (`blockwise.block_may_attend`), and
the index maps of the skipped steps past the last needed block (or before the first) repeat
that block so no DMA is issued for them. The mask inside a tile is `reference.allowed`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llm.kernels.block_sizes import BlockSizes
from llm.kernels.blockwise import (
    block_may_attend,
    block_needs_mask,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_step,
)
from llm.kernels.reference import MASK_VALUE, allowed

_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _col(row: jax.Array) -> jax.Array:
    """[1, n] -> [n, 1] through an aligned [128, n] transpose (Mosaic-friendly)."""
    return jnp.transpose(jnp.broadcast_to(row, (_LANES, row.shape[1])))[:, 0:1]


def _interpret_arg(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


# ------------------------------------------------------------- masks: shared by all kernels
#
# Per-block summaries come in by scalar prefetch (SMEM), keyed by name:
#   segments: q_lo, q_hi [batch, q_blocks], k_lo, k_hi [batch, kv_blocks]  (id ranges)
#   prefix:   q_pf [batch, q_blocks], k_pf [batch, kv_blocks]  (block holds prefix positions),
#             k_pf_last [batch] (last kv block with prefix, -1 if none),
#             q_pf_first [batch] (first q block with prefix, q_blocks if none).
# The per-position ids / prefix flags come in as lane-major VMEM blocks ([1, block]).

def _summaries(q_seg, kv_seg, q_pfx, kv_pfx, bq: int, bk: int):
    """-> (names, arrays) of the scalar-prefetch block summaries."""
    names, arrays = [], []

    def blocked(x, block):
        return x.reshape(x.shape[0], -1, block)

    if q_seg is not None:
        names += ["q_lo", "q_hi", "k_lo", "k_hi"]
        arrays += [jnp.min(blocked(q_seg, bq), 2), jnp.max(blocked(q_seg, bq), 2),
                   jnp.min(blocked(kv_seg, bk), 2), jnp.max(blocked(kv_seg, bk), 2)]
    if q_pfx is not None:
        q_pf = jnp.max(blocked(q_pfx, bq), 2)
        k_pf = jnp.max(blocked(kv_pfx, bk), 2)
        nq, nk = q_pf.shape[1], k_pf.shape[1]
        names += ["q_pf", "k_pf", "k_pf_last", "q_pf_first"]
        arrays += [q_pf, k_pf, jnp.max(jnp.where(k_pf > 0, jnp.arange(nk), -1), 1),
                   jnp.min(jnp.where(q_pf > 0, jnp.arange(nq), nq), 1)]
    return names, [a.astype(jnp.int32) for a in arrays]


def _flags(pre: dict, b, i, j, *, block_q: int, block_kv: int, causal: bool,
           q_len_valid: int | None, kv_len_valid: int | None, mask_kv_len: bool):
    """(run, needs_mask) of the tile (q block i, kv block j): the block-skip tests."""
    seg, pfx = "q_lo" in pre, "q_pf" in pre
    run = block_may_attend(
        i * block_q, (i + 1) * block_q - 1, j * block_kv, causal=causal, q_len=q_len_valid,
        kv_len=kv_len_valid,
        q_ids=(pre["q_lo"][b, i], pre["q_hi"][b, i]) if seg else None,
        k_ids=(pre["k_lo"][b, j], pre["k_hi"][b, j]) if seg else None,
        q_prefix=pre["q_pf"][b, i] if pfx else None, k_prefix=pre["k_pf"][b, j] if pfx else None)
    needs_mask = block_needs_mask(i * block_q, (j + 1) * block_kv - 1, causal=causal,
                                  kv_len=kv_len_valid if mask_kv_len else None, segments=seg)
    return run, needs_mask


def _mask_scores(s, i, j, *, block_q: int, block_kv: int, transposed: bool, causal: bool,
                 kv_len: int | None, ids, prefix):
    """`allowed` on one tile: s is [block_q, block_kv] (or its transpose); ids / prefix are
    (q_ref, k_ref) lane-major [1, block] refs or None."""
    shape = s.shape
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, shape, k_axis)

    def q_side(ref):
        return ref[...] if transposed else _col(ref[...])

    def k_side(ref):
        return _col(ref[...]) if transposed else ref[...]

    mask = allowed(q_pos, k_pos, causal=causal, kv_len=kv_len,
                   q_ids=q_side(ids[0]) if ids else None, k_ids=k_side(ids[1]) if ids else None,
                   q_prefix=q_side(prefix[0]) if prefix else None,
                   k_prefix=k_side(prefix[1]) if prefix else None)
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _kv_index(pre: dict, b, i, j, *, block_q: int, block_kv: int, causal: bool, last_kv: int):
    """kv block fetched at step (i, j) of the forward / dQ grids: skipped steps past the last
    block q block i may attend re-point at it, so no DMA is issued for them."""
    if causal:
        hi = ((i + 1) * block_q - 1) // block_kv
        if "q_pf" in pre:  # prefix queries also see the prefix keys past the diagonal
            hi = jnp.where(pre["q_pf"][b, i] > 0, jnp.maximum(hi, pre["k_pf_last"][b]), hi)
        j = jnp.minimum(j, hi)
    return jnp.minimum(j, last_kv)


def _q_index(pre: dict, b, j, i, *, block_q: int, block_kv: int, causal: bool, last_q: int):
    """q block fetched at step (j, i) of the dK/dV grid: steps before the first q block that
    sees kv block j re-point at it."""
    if causal:
        lo = (j * block_kv) // block_q
        if "q_pf" in pre:
            lo = jnp.where(pre["k_pf"][b, j] > 0, jnp.minimum(lo, pre["q_pf_first"][b]), lo)
        i = jnp.maximum(i, lo)
    return jnp.minimum(i, last_q)


def _split(refs, *counts):
    out, k = [], 0
    for c in counts:
        out.append(refs[k:k + c])
        k += c
    out.append(refs[k:])
    return out


def _row_inputs(q_seg, kv_seg, q_pfx, kv_pfx, q_map, kv_map, bq: int, bk: int):
    """Lane-major [batch, 1, len] id / prefix inputs and their BlockSpecs (q side, kv side)."""
    specs, args = [], []
    for q_x, kv_x in ((q_seg, kv_seg), (q_pfx, kv_pfx)):
        if q_x is not None:
            specs += [pl.BlockSpec((None, 1, bq), q_map), pl.BlockSpec((None, 1, bk), kv_map)]
            args += [q_x[:, None, :], kv_x[:, None, :]]
    return specs, args


class _QMajorGrid:
    """Grid (batch, heads, q_blocks, kv_blocks) of the forward and dQ kernels: scalar
    prefetch, the BlockSpecs of q-shaped and kv-shaped operands (kv index maps skip the DMA of
    steps past the last block a q block attends) and the id / prefix row inputs."""

    def __init__(self, q, k, q_seg, kv_seg, q_pfx, kv_pfx, bq: int, bk: int, causal: bool,
                 kv_len_valid: int):
        batch, q_len, heads, head_dim = q.shape
        groups = heads // k.shape[2]
        self.grid = (batch, heads, q_len // bq, k.shape[1] // bk)
        names, self.prefetch = _summaries(q_seg, kv_seg, q_pfx, kv_pfx, bq, bk)
        self.names = tuple(names)
        kv_index = functools.partial(_kv_index, block_q=bq, block_kv=bk, causal=causal,
                                     last_kv=-(-kv_len_valid // bk) - 1)

        def kv_block(b, i, j, refs):
            return kv_index(dict(zip(names, refs)), b, i, j)

        self.q_spec = pl.BlockSpec((None, None, bq, head_dim),
                                   lambda b, h, i, j, *_: (b, h, i, 0))
        self.kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j, *refs: (
            b, h // groups, kv_block(b, i, j, refs), 0))
        self.row_specs, self.row_args = _row_inputs(
            q_seg, kv_seg, q_pfx, kv_pfx, lambda b, h, i, j, *_: (b, 0, i),
            lambda b, h, i, j, *refs: (b, 0, kv_block(b, i, j, refs)), bq, bk)


# ------------------------------------------------------------------------------ forward

def _fwd_kernel(*refs, names: tuple[str, ...], sm_scale: float, causal: bool,
                has_segments: bool, has_prefix: bool, kv_len_valid: int, block_q: int,
                block_kv: int, num_kv_blocks: int):
    pre_refs, (q_ref, k_ref, v_ref), ids, pfx, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split(
        refs, len(names), 3, 2 * has_segments, 2 * has_prefix)
    pre = dict(zip(names, pre_refs))
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...], l_scr[...], acc_scr[...] = online_softmax_init(m_scr.shape, acc_scr.shape)

    kv_len_mask = kv_len_valid if kv_len_valid % block_kv else None
    run, needs_mask = _flags(pre, b, i, j, block_q=block_q, block_kv=block_kv, causal=causal,
                             q_len_valid=None, kv_len_valid=kv_len_valid,
                             mask_kv_len=kv_len_mask is not None)

    def step(masked: bool):
        s = lax.dot_general(q_ref[...], k_ref[...], _NT,
                            preferred_element_type=jnp.float32) * sm_scale
        if masked:
            s = _mask_scores(s, i, j, block_q=block_q, block_kv=block_kv, transposed=False,
                             causal=causal, kv_len=kv_len_mask, ids=ids, prefix=pfx)
        m_scr[...], l_scr[...], acc_scr[...] = online_softmax_step(
            m_scr[...], l_scr[...], acc_scr[...], s, v_ref[...])

    pl.when(run & needs_mask)(functools.partial(step, True))
    pl.when(run & jnp.logical_not(needs_mask))(functools.partial(step, False))

    @pl.when(j == num_kv_blocks - 1)
    def _finalize():
        out, lse = online_softmax_finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.transpose(lse)[0:1, :]  # [block_q, 128] lanes equal -> [1, block_q]


def _to_bhld(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 1, 3))


def forward(q, k, v, q_seg, kv_seg, q_pfx, kv_pfx, *, sm_scale: float, causal: bool,
            kv_len_valid: int, blocks: BlockSizes, interpret: bool):
    """Returns (out [batch, q_len, heads, head_dim], lse [batch, heads, 1, q_len] fp32)."""
    batch, q_len, heads, head_dim = q.shape
    bq, bk = blocks.block_q, blocks.block_kv
    g = _QMajorGrid(q, k, q_seg, kv_seg, q_pfx, kv_pfx, bq, bk, causal, kv_len_valid)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, names=g.names, sm_scale=sm_scale, causal=causal,
                          has_segments=q_seg is not None, has_prefix=q_pfx is not None,
                          kv_len_valid=kv_len_valid, block_q=bq, block_kv=bk,
                          num_kv_blocks=g.grid[3]),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(g.prefetch),
            grid=g.grid,
            in_specs=[g.q_spec, g.kv_spec, g.kv_spec, *g.row_specs],
            out_specs=[g.q_spec,
                       pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))],
            scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                            pltpu.VMEM((bq, _LANES), jnp.float32),
                            pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, heads, q_len, head_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, 1, q_len), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="flash_attention_fwd",
    )(*g.prefetch, _to_bhld(q), _to_bhld(k), _to_bhld(v), *g.row_args)
    return _to_bhld(out), lse


# ----------------------------------------------------------------------------- backward

def _dq_kernel(*refs, names: tuple[str, ...], sm_scale: float, causal: bool,
               has_segments: bool, has_prefix: bool, kv_len_valid: int, block_q: int,
               block_kv: int, num_kv_blocks: int):
    pre_refs, ins, ids, pfx, (dq_ref, acc_scr) = _split(
        refs, len(names), 6, 2 * has_segments, 2 * has_prefix)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    pre = dict(zip(names, pre_refs))
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kv_len_mask = kv_len_valid if kv_len_valid % block_kv else None

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    run, needs_mask = _flags(pre, b, i, j, block_q=block_q, block_kv=block_kv, causal=causal,
                             q_len_valid=None, kv_len_valid=kv_len_valid,
                             mask_kv_len=kv_len_mask is not None)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * sm_scale
        if masked:
            s = _mask_scores(s, i, j, block_q=block_q, block_kv=block_kv, transposed=False,
                             causal=causal, kv_len=kv_len_mask, ids=ids, prefix=pfx)
        p = jnp.exp(s - _col(lse_ref[...]))
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _col(delta_ref[...]))
        acc_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    pl.when(run & needs_mask)(functools.partial(step, True))
    pl.when(run & jnp.logical_not(needs_mask))(functools.partial(step, False))

    @pl.when(j == num_kv_blocks - 1)
    def _finalize():
        dq_ref[...] = (acc_scr[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, names: tuple[str, ...], sm_scale: float, causal: bool,
                has_segments: bool, has_prefix: bool, q_len_valid: int, kv_len_valid: int,
                block_q: int, block_kv: int, num_q_blocks: int, groups: int):
    pre_refs, ins, ids, pfx, (dk_ref, dv_ref, dk_scr, dv_scr) = _split(
        refs, len(names), 6, 2 * has_segments, 2 * has_prefix)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    pre = dict(zip(names, pre_refs))
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = t % num_q_blocks

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    # kv padding needs no mask here: those dk/dv rows are sliced away. Padded q rows carry
    # dO = 0, and whole padded q blocks are skipped.
    run, needs_mask = _flags(pre, b, i, j, block_q=block_q, block_kv=block_kv, causal=causal,
                             q_len_valid=q_len_valid, kv_len_valid=kv_len_valid,
                             mask_kv_len=False)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * sm_scale
        if masked:
            s_t = _mask_scores(s_t, i, j, block_q=block_q, block_kv=block_kv, transposed=True,
                               causal=causal, kv_len=None, ids=ids, prefix=pfx)
        p_t = jnp.exp(s_t - lse_ref[...])  # [block_kv, block_q]
        dv_scr[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_scr[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    pl.when(run & needs_mask)(functools.partial(step, True))
    pl.when(run & jnp.logical_not(needs_mask))(functools.partial(step, False))

    @pl.when(t == groups * num_q_blocks - 1)
    def _finalize():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, q_pfx, kv_pfx, lse, delta, do, *, sm_scale: float,
             causal: bool, q_len_valid: int, kv_len_valid: int, blocks: BlockSizes,
             interpret: bool):
    """Returns (dq, dk, dv) shaped like q, k, v. `lse` is the forward's [b, h, 1, q_len],
    delta [b, h, q_len] = rowsum(out * do)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    flags = dict(has_segments=q_seg is not None, has_prefix=q_pfx is not None)
    args = [_to_bhld(q), _to_bhld(k), _to_bhld(v), _to_bhld(do), lse, delta[:, :, None, :]]
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    # dQ: one q block per (b, h, i), loop over kv blocks j.
    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    g = _QMajorGrid(q, k, q_seg, kv_seg, q_pfx, kv_pfx, bq, bk, causal, kv_len_valid)
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, names=g.names, sm_scale=sm_scale, causal=causal,
                          kv_len_valid=kv_len_valid, block_q=bq, block_kv=bk,
                          num_kv_blocks=g.grid[3], **flags),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(g.prefetch), grid=g.grid,
            in_specs=[g.q_spec, g.kv_spec, g.kv_spec, g.q_spec, row_spec, row_spec,
                      *g.row_specs],
            out_specs=g.q_spec,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(args[0].shape, q.dtype),
        compiler_params=params,
        interpret=_interpret_arg(interpret),
        name="flash_attention_dq",
    )(*g.prefetch, *args, *g.row_args)

    # dK/dV: one kv block per (b, kv_head, j), loop over (group head g, q block i).
    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    nq, nk = q_len // bq, kv_len // bk
    names, prefetch = _summaries(q_seg, kv_seg, q_pfx, kv_pfx, bq, bk)
    q_index = functools.partial(_q_index, block_q=bq, block_kv=bk, causal=causal,
                                last_q=-(-q_len_valid // bq) - 1)

    def q_block(b, j, t, refs):
        return q_index(dict(zip(names, refs)), b, j, t % nq)

    def q_head(h, t):
        return h * groups + t // nq

    q_spec = pl.BlockSpec((None, None, bq, head_dim),
                          lambda b, h, j, t, *refs: (b, q_head(h, t), q_block(b, j, t, refs), 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, t, *_: (b, h, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq),
                            lambda b, h, j, t, *refs: (b, q_head(h, t), 0, q_block(b, j, t, refs)))
    row_specs, row_args = _row_inputs(
        q_seg, kv_seg, q_pfx, kv_pfx, lambda b, h, j, t, *refs: (b, 0, q_block(b, j, t, refs)),
        lambda b, h, j, t, *_: (b, 0, j), bq, bk)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, names=tuple(names), sm_scale=sm_scale, causal=causal,
                          q_len_valid=q_len_valid, kv_len_valid=kv_len_valid, block_q=bq,
                          block_kv=bk, num_q_blocks=nq, groups=groups, **flags),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(batch, kv_heads, nk, groups * nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *row_specs],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                            pltpu.VMEM((bk, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(args[1].shape, k.dtype),
                   jax.ShapeDtypeStruct(args[2].shape, v.dtype)],
        compiler_params=params,
        interpret=_interpret_arg(interpret),
        name="flash_attention_dkv",
    )(*prefetch, *args, *row_args)
    return _to_bhld(dq), _to_bhld(dk), _to_bhld(dv)
