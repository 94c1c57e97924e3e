"""Flash attention for TPUs: Pallas kernels lowered through Mosaic.

Takes the model layout (q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
head_dim], lengths already padded to the blocks) and works internally in [batch, heads, len,
head_dim] so each block's last two dims are (positions, head_dim) as Mosaic's (8, 128) tiling
wants. Row statistics (logsumexp, delta) and segment ids are stored lane-major
([batch, heads, 1, len] / [batch, 1, len]) so they cost 4 bytes per position in HBM.

Three pallas_calls, each with the reduction axis innermost ("arbitrary") and VMEM scratch
accumulators:
  forward  grid (batch, heads, q_blocks, kv_blocks)
  dQ       grid (batch, heads, q_blocks, kv_blocks)
  dK/dV    grid (batch, kv_heads, kv_blocks, groups * q_blocks); computed in the transposed
           orientation (keys on sublanes) so no in-kernel transposes of the big tiles.
A block that is fully masked (above the causal diagonal, past the valid length, or with
segment-id ranges that cannot meet; ranges come in through scalar prefetch) is not computed,
and its index map repeats the previous block so no DMA is issued for it either.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llm.kernels.block_sizes import BlockSizes
from llm.kernels.reference import MASK_VALUE

_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _col(row: jax.Array) -> jax.Array:
    """[1, n] -> [n, 1] through an aligned [128, n] transpose (Mosaic-friendly)."""
    return jnp.transpose(jnp.broadcast_to(row, (_LANES, row.shape[1])))[:, 0:1]


def _block_ranges(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per-block (min, max) segment id: [batch, len] -> 2 x [batch, len // block]."""
    blocked = ids.reshape(ids.shape[0], -1, block)
    return jnp.min(blocked, axis=2), jnp.max(blocked, axis=2)


def _interpret_arg(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _mask(q_pos, k_pos, *, causal: bool, kv_len_valid: int | None, q_ids, k_ids):
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        mask = both(mask, q_pos >= k_pos)
    if kv_len_valid is not None:
        mask = both(mask, k_pos < kv_len_valid)
    if q_ids is not None:
        mask = both(mask, q_ids == k_ids)
    return mask


def _fwd_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, kv_len_valid: int,
                block_q: int, block_kv: int, num_kv_blocks: int):
    if has_segments:
        (q_lo, q_hi, k_lo, k_hi, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref,
         m_scr, l_scr, acc_scr) = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_kv = -(-kv_len_valid // block_kv)
    padded_kv = kv_len_valid % block_kv != 0

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    run = j < n_kv
    needs_mask = jnp.bool_(has_segments)
    if causal:
        run = run & (j * block_kv <= (i + 1) * block_q - 1)
        needs_mask = needs_mask | ((j + 1) * block_kv - 1 > i * block_q)
    if padded_kv:
        needs_mask = needs_mask | (j == n_kv - 1)
    if has_segments:
        run = run & (k_lo[b, j] <= q_hi[b, i]) & (k_hi[b, j] >= q_lo[b, i])

    def step(masked: bool):
        q = q_ref[...]
        k = k_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * sm_scale
        if masked:
            shape = (block_q, block_kv)
            mask = _mask(i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0),
                         j * block_kv + lax.broadcasted_iota(jnp.int32, shape, 1),
                         causal=causal, kv_len_valid=kv_len_valid if padded_kv else None,
                         q_ids=_col(qs_ref[...]) if has_segments else None,
                         k_ids=ks_ref[...] if has_segments else None)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, 0:1])
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_new
        v = v_ref[...]
        acc_scr[...] = acc_scr[...] * alpha[:, 0:1] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    pl.when(run & needs_mask)(functools.partial(step, True))
    pl.when(run & jnp.logical_not(needs_mask))(functools.partial(step, False))

    @pl.when(j == num_kv_blocks - 1)
    def _finalize():
        m, l = m_scr[...], l_scr[...]
        valid = m > MASK_VALUE  # rows that attend nothing give 0, like the reference
        l_safe = jnp.where(valid, l, 1.0)
        o_ref[...] = jnp.where(valid[:, 0:1], acc_scr[...] / l_safe[:, 0:1],
                               0.0).astype(o_ref.dtype)
        lse = jnp.where(valid, m + jnp.log(l_safe), jnp.inf)  # [block_q, 128], lanes equal
        lse_ref[...] = jnp.transpose(lse)[0:1, :]


def _to_bhld(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 1, 3))


def _segment_inputs(q_seg, kv_seg, block_q: int, block_kv: int):
    q_lo, q_hi = _block_ranges(q_seg, block_q)
    k_lo, k_hi = _block_ranges(kv_seg, block_kv)
    return [q_lo, q_hi, k_lo, k_hi], [q_seg[:, None, :], kv_seg[:, None, :]]


def forward(q, k, v, q_seg, kv_seg, *, sm_scale: float, causal: bool, kv_len_valid: int,
            blocks: BlockSizes, interpret: bool):
    """Returns (out [batch, q_len, heads, head_dim], lse [batch, heads, 1, q_len] fp32)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = blocks.block_q, blocks.block_kv
    nq, nk = q_len // bq, kv_len // bk
    has_segments = q_seg is not None
    last_kv = -(-kv_len_valid // bk) - 1

    def kv_block(i, j):  # skipped steps re-point at the last useful block: no new DMA
        if causal:
            j = jnp.minimum(j, ((i + 1) * bq - 1) // bk)
        return jnp.minimum(j, last_kv)

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                           lambda b, h, i, j, *_: (b, h // groups, kv_block(i, j), 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [_to_bhld(q), _to_bhld(k), _to_bhld(v)]
    prefetch = []
    if has_segments:
        prefetch, seg_args = _segment_inputs(q_seg, kv_seg, bq, bk)
        in_specs += [pl.BlockSpec((None, 1, bq), lambda b, h, i, j, *_: (b, 0, i)),
                     pl.BlockSpec((None, 1, bk), lambda b, h, i, j, *_: (b, 0, kv_block(i, j)))]
        args += seg_args
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal,
                          has_segments=has_segments, kv_len_valid=kv_len_valid, block_q=bq,
                          block_kv=bk, num_kv_blocks=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, heads, nq, nk),
            in_specs=in_specs,
            out_specs=[q_spec,
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
    )(*prefetch, *args)
    return _to_bhld(out), lse


def _dq_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, kv_len_valid: int,
               block_q: int, block_kv: int, num_kv_blocks: int):
    if has_segments:
        (q_lo, q_hi, k_lo, k_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref,
         ks_ref, dq_ref, acc_scr) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_scr = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_kv = -(-kv_len_valid // block_kv)
    padded_kv = kv_len_valid % block_kv != 0

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    run = j < n_kv
    needs_mask = jnp.bool_(has_segments)
    if causal:
        run = run & (j * block_kv <= (i + 1) * block_q - 1)
        needs_mask = needs_mask | ((j + 1) * block_kv - 1 > i * block_q)
    if padded_kv:
        needs_mask = needs_mask | (j == n_kv - 1)
    if has_segments:
        run = run & (k_lo[b, j] <= q_hi[b, i]) & (k_hi[b, j] >= q_lo[b, i])

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * sm_scale
        if masked:
            shape = (block_q, block_kv)
            mask = _mask(i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0),
                         j * block_kv + lax.broadcasted_iota(jnp.int32, shape, 1),
                         causal=causal, kv_len_valid=kv_len_valid if padded_kv else None,
                         q_ids=_col(qs_ref[...]) if has_segments else None,
                         k_ids=ks_ref[...] if has_segments else None)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - _col(lse_ref[...]))
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _col(delta_ref[...]))
        acc_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    pl.when(run & needs_mask)(functools.partial(step, True))
    pl.when(run & jnp.logical_not(needs_mask))(functools.partial(step, False))

    @pl.when(j == num_kv_blocks - 1)
    def _finalize():
        dq_ref[...] = (acc_scr[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, q_len_valid: int,
                kv_len_valid: int, block_q: int, block_kv: int, num_q_blocks: int,
                groups: int):
    if has_segments:
        (q_lo, q_hi, k_lo, k_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref,
         ks_ref, dk_ref, dv_ref, dk_scr, dv_scr) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = t % num_q_blocks
    n_q = -(-q_len_valid // block_q)

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    run = (i < n_q) & (j * block_kv < kv_len_valid)
    needs_mask = jnp.bool_(has_segments)
    if causal:
        run = run & ((i + 1) * block_q - 1 >= j * block_kv)
        needs_mask = needs_mask | (i * block_q < (j + 1) * block_kv - 1)
    if has_segments:
        run = run & (k_lo[b, j] <= q_hi[b, i]) & (k_hi[b, j] >= q_lo[b, i])

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * sm_scale
        if masked:  # kv padding needs no mask here: those dk/dv rows are sliced away
            shape = (block_kv, block_q)
            mask = _mask(i * block_q + lax.broadcasted_iota(jnp.int32, shape, 1),
                         j * block_kv + lax.broadcasted_iota(jnp.int32, shape, 0),
                         causal=causal, kv_len_valid=None,
                         q_ids=qs_ref[...] if has_segments else None,
                         k_ids=_col(ks_ref[...]) if has_segments else None)
            if mask is not None:
                s_t = jnp.where(mask, s_t, MASK_VALUE)
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


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, sm_scale: float, causal: bool,
             q_len_valid: int, kv_len_valid: int, blocks: BlockSizes, interpret: bool):
    """Returns (dq, dk, dv) shaped like q, k, v. `lse` is the forward's [b, h, 1, q_len]."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    has_segments = q_seg is not None
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                       do.astype(jnp.float32))[:, :, None, :]
    qt, kt, vt, dot_ = _to_bhld(q), _to_bhld(k), _to_bhld(v), _to_bhld(do)
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    # dQ: one q block per (b, h, i), loop over kv blocks j.
    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    nq, nk = q_len // bq, kv_len // bk
    last_kv = -(-kv_len_valid // bk) - 1

    def kv_block(i, j):
        if causal:
            j = jnp.minimum(j, ((i + 1) * bq - 1) // bk)
        return jnp.minimum(j, last_kv)

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                           lambda b, h, i, j, *_: (b, h // groups, kv_block(i, j), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qt, kt, vt, dot_, lse, delta]
    prefetch = []
    if has_segments:
        prefetch, seg_args = _segment_inputs(q_seg, kv_seg, bq, bk)
        in_specs += [pl.BlockSpec((None, 1, bq), lambda b, h, i, j, *_: (b, 0, i)),
                     pl.BlockSpec((None, 1, bk), lambda b, h, i, j, *_: (b, 0, kv_block(i, j)))]
        args += seg_args
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, causal=causal,
                          has_segments=has_segments, kv_len_valid=kv_len_valid, block_q=bq,
                          block_kv=bk, num_kv_blocks=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(batch, heads, nq, nk),
            in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=params,
        interpret=_interpret_arg(interpret),
        name="flash_attention_dq",
    )(*prefetch, *args)

    # dK/dV: one kv block per (b, kv_head, j), loop over (group head g, q block i).
    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    nq, nk = q_len // bq, kv_len // bk
    last_q = -(-q_len_valid // bq) - 1

    def q_block(j, t):
        i = t % nq
        if causal:
            i = jnp.maximum(i, (j * bk) // bq)
        return jnp.minimum(i, last_q)

    def q_head(h, t):
        return h * groups + t // nq

    q_spec = pl.BlockSpec((None, None, bq, head_dim),
                          lambda b, h, j, t, *_: (b, q_head(h, t), q_block(j, t), 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, t, *_: (b, h, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq),
                            lambda b, h, j, t, *_: (b, q_head(h, t), 0, q_block(j, t)))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qt, kt, vt, dot_, lse, delta]
    prefetch = []
    if has_segments:
        prefetch, seg_args = _segment_inputs(q_seg, kv_seg, bq, bk)
        in_specs += [pl.BlockSpec((None, 1, bq), lambda b, h, j, t, *_: (b, 0, q_block(j, t))),
                     pl.BlockSpec((None, 1, bk), lambda b, h, j, t, *_: (b, 0, j))]
        args += seg_args
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, causal=causal,
                          has_segments=has_segments, q_len_valid=q_len_valid,
                          kv_len_valid=kv_len_valid, block_q=bq, block_kv=bk,
                          num_q_blocks=nq, groups=groups),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(batch, kv_heads, nk, groups * nq),
            in_specs=in_specs, out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                            pltpu.VMEM((bk, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype),
                   jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=params,
        interpret=_interpret_arg(interpret),
        name="flash_attention_dkv",
    )(*prefetch, *args)
    return _to_bhld(dq), _to_bhld(dk), _to_bhld(dv)
