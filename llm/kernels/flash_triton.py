"""Flash attention for GPUs: Pallas kernels lowered through Triton.

Layout is the model's: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
head_dim]; q_len and kv_len here are already padded to a multiple of every block (see
`flash_attention.py`), `kv_len_valid` is the unpadded kv length. Softmax runs in base 2
(scores pre-multiplied by sm_scale * log2(e)) and the saved logsumexp `lse` is base 2 too.

Three pallas_calls:
  forward  grid (q_blocks, batch, heads):    loops over kv blocks, online softmax.
  dK/dV    grid (kv_blocks, batch, kv_heads): loops over the q heads of its group and q blocks.
  dQ       grid (q_blocks, batch, heads):    loops over kv blocks.
Every kv (or q) loop is split into a range of blocks that need no mask and a range that does;
blocks that are fully masked (above the causal diagonal, or whose segment-id range cannot
meet the other side's) are never visited.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llm.kernels.block_sizes import BlockSizes
from llm.kernels.reference import MASK_VALUE

LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def block_mask(q_pos: jax.Array, k_pos: jax.Array, *, causal: bool, kv_len_valid: int | None,
               q_ids: jax.Array | None, k_ids: jax.Array | None) -> jax.Array:
    """[len(q_pos), len(k_pos)] bool, True where a query may attend a key."""
    mask = jnp.ones((q_pos.shape[0], k_pos.shape[0]), dtype=jnp.bool_)
    if causal:
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    if kv_len_valid is not None:
        mask = mask & (k_pos[None, :] < kv_len_valid)
    if q_ids is not None:
        mask = mask & (q_ids[:, None] == k_ids[None, :])
    return mask


def _ranges_meet(lo_a, hi_a, ids_b: jax.Array) -> jax.Array:
    """False when no id in `ids_b` can equal an id in [lo_a, hi_a]: the block is all masked."""
    return (jnp.min(ids_b) <= hi_a) & (jnp.max(ids_b) >= lo_a)


def _fwd_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, kv_len_valid: int,
                block_q: int, block_kv: int):
    if has_segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    i = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    q = q_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_ids = qs_ref[...] if has_segments else None
    padded_kv = kv_len_valid % block_kv != 0
    n_kv = -(-kv_len_valid // block_kv)  # blocks holding at least one real key

    def step(j, carry, masked: bool, k_ids=None):
        acc, m, l = carry
        kv_slice = pl.ds(j * block_kv, block_kv)
        k = k_ref[kv_slice, :]
        v = v_ref[kv_slice, :]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * (sm_scale * LOG2E)
        if masked:
            k_pos = j * block_kv + jnp.arange(block_kv)
            mask = block_mask(q_pos, k_pos, causal=causal,
                              kv_len_valid=kv_len_valid if padded_kv else None,
                              q_ids=q_ids, k_ids=k_ids)
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l

    carry = (jnp.zeros((block_q, head_dim), jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    hi = jnp.minimum(_cdiv((i + 1) * block_q, block_kv), n_kv) if causal else n_kv
    if has_segments:
        q_lo, q_hi = jnp.min(q_ids), jnp.max(q_ids)

        def seg_step(j, carry):
            k_ids = ks_ref[pl.ds(j * block_kv, block_kv)]
            return lax.cond(_ranges_meet(q_lo, q_hi, k_ids),
                            lambda c: step(j, c, True, k_ids), lambda c: c, carry)

        carry = lax.fori_loop(0, hi, seg_step, carry)
    else:
        n_full = kv_len_valid // block_kv
        if causal:
            n_full = jnp.minimum(lax.div(i * block_q + 1, block_kv), n_full)
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(n_full, hi, functools.partial(step, masked=True), carry)
    acc, m, l = carry
    valid = m > MASK_VALUE  # False for rows that attend to nothing: output 0, like the reference
    l_safe = jnp.where(valid, l, 1.0)
    o_ref[...] = jnp.where(valid[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(valid, m + jnp.log2(l_safe), jnp.inf)


def _num_warps(blocks: BlockSizes, head_dim: int) -> int:
    return blocks.num_warps or (4 if head_dim <= 64 else 8)


def forward(q, k, v, q_seg, kv_seg, *, sm_scale: float, causal: bool, kv_len_valid: int,
            blocks: BlockSizes, interpret: bool):
    """Returns (out [batch, q_len, heads, head_dim], lse [batch, heads, q_len] fp32, base 2)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = blocks.block_q, blocks.block_kv
    has_segments = q_seg is not None
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal,
                               has_segments=has_segments, kv_len_valid=kv_len_valid,
                               block_q=bq, block_kv=bk)
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
    ]
    args = [q, k, v]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel,
        grid=(q_len // bq, batch, heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(blocks, head_dim),
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)


def _dq_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, kv_len_valid: int,
               block_q: int, block_kv: int):
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_ids = qs_ref[...] if has_segments else None
    padded_kv = kv_len_valid % block_kv != 0
    n_kv = -(-kv_len_valid // block_kv)

    def step(j, dq, masked: bool, k_ids=None):
        kv_slice = pl.ds(j * block_kv, block_kv)
        k = k_ref[kv_slice, :]
        v = v_ref[kv_slice, :]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * (sm_scale * LOG2E)
        if masked:
            k_pos = j * block_kv + jnp.arange(block_kv)
            mask = block_mask(q_pos, k_pos, causal=causal,
                              kv_len_valid=kv_len_valid if padded_kv else None,
                              q_ids=q_ids, k_ids=k_ids)
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jnp.zeros(q.shape, jnp.float32)
    hi = jnp.minimum(_cdiv((i + 1) * block_q, block_kv), n_kv) if causal else n_kv
    if has_segments:
        q_lo, q_hi = jnp.min(q_ids), jnp.max(q_ids)

        def seg_step(j, dq):
            k_ids = ks_ref[pl.ds(j * block_kv, block_kv)]
            return lax.cond(_ranges_meet(q_lo, q_hi, k_ids),
                            lambda c: step(j, c, True, k_ids), lambda c: c, dq)

        dq = lax.fori_loop(0, hi, seg_step, dq)
    else:
        n_full = kv_len_valid // block_kv
        if causal:
            n_full = jnp.minimum(lax.div(i * block_q + 1, block_kv), n_full)
        dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(n_full, hi, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, q_len_valid: int,
                groups: int, block_q: int, block_kv: int):
    if has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    k_pos = j * block_kv + jnp.arange(block_kv)
    k_ids = ks_ref[...] if has_segments else None
    n_q = -(-q_len_valid // block_q)  # padded q rows carry dO = 0, whole padded blocks skip

    def step(i, carry, g, masked: bool, q_ids=None):
        dk, dv = carry
        q_slice = pl.ds(i * block_q, block_q)
        q = q_ref[q_slice, g, :]
        do = do_ref[q_slice, g, :]
        lse = lse_ref[g, q_slice]
        delta = delta_ref[g, q_slice]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * (sm_scale * LOG2E)
        if masked:
            q_pos = i * block_q + jnp.arange(block_q)
            mask = block_mask(q_pos, k_pos, causal=causal, kv_len_valid=None, q_ids=q_ids,
                              k_ids=k_ids)
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN,
                                  preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
        return dk, dv

    if causal:
        lo = lax.div(j * block_kv, block_q)
        full_from = jnp.minimum(_cdiv((j + 1) * block_kv - 1, block_q), n_q)
    else:
        lo, full_from = 0, 0

    def group_loop(g, carry):
        if has_segments:
            k_lo, k_hi = jnp.min(k_ids), jnp.max(k_ids)

            def seg_step(i, carry):
                q_ids = qs_ref[pl.ds(i * block_q, block_q)]
                return lax.cond(_ranges_meet(k_lo, k_hi, q_ids),
                                lambda c: step(i, c, g, True, q_ids), lambda c: c, carry)

            return lax.fori_loop(lo, n_q, seg_step, carry)
        if causal:
            carry = lax.fori_loop(lo, full_from, functools.partial(step, g=g, masked=True), carry)
        return lax.fori_loop(full_from, n_q, functools.partial(step, g=g, masked=False), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, group_loop, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, sm_scale: float, causal: bool,
             q_len_valid: int, kv_len_valid: int, blocks: BlockSizes, interpret: bool):
    """Returns (dq, dk, dv) shaped like q, k, v. `lse` is the forward's base-2 logsumexp."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    has_segments = q_seg is not None
    # delta_i = sum_d o_id * do_id: a memory-bound row reduction XLA fuses well.
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    params = plgpu.CompilerParams(num_warps=_num_warps(blocks, head_dim),
                                  num_stages=blocks.num_stages)

    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
    ]
    args = [q, k, v, do, lse, delta]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))]
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, causal=causal,
                          has_segments=has_segments, kv_len_valid=kv_len_valid, block_q=bq,
                          block_kv=bk),
        grid=(q_len // bq, batch, heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(*args)

    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    in_specs = [
        pl.BlockSpec((None, q_len, groups, head_dim), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0)),
        pl.BlockSpec((None, q_len, groups, head_dim), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, groups, q_len), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((None, groups, q_len), lambda j, b, h: (b, h, 0)),
    ]
    args = [q, k, v, do, lse, delta]
    if has_segments:
        in_specs += [pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
        args += [q_seg, kv_seg]
    kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, causal=causal,
                          has_segments=has_segments, q_len_valid=q_len_valid, groups=groups,
                          block_q=bq, block_kv=bk),
        grid=(kv_len // bk, batch, kv_heads),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv
