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
blocks that are fully masked (above the causal diagonal unless both hold prefix-LM
positions, or whose segment-id range cannot meet the other side's) are never visited
(`blockwise.block_may_attend`). The mask inside a tile is `reference.allowed`.
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
from llm.kernels.blockwise import (
    block_may_attend,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_step,
)
from llm.kernels.reference import MASK_VALUE, allowed

LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _mask_scores(s, q_pos, k_pos, *, causal: bool, kv_len: int | None, q_ids=None, k_ids=None,
                 q_pfx=None, k_pfx=None):
    """`allowed` on one [len(q_pos), len(k_pos)] tile of scores; masked entries MASK_VALUE."""

    def q_side(x):
        return None if x is None else x[:, None]

    def k_side(x):
        return None if x is None else x[None, :]

    mask = allowed(q_side(q_pos), k_side(k_pos), causal=causal, kv_len=kv_len,
                   q_ids=q_side(q_ids), k_ids=k_side(k_ids), q_prefix=q_side(q_pfx),
                   k_prefix=k_side(k_pfx))
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _summary(ids, pfx):
    """Block summary for `block_may_attend`: ((min id, max id) or None, has prefix or None)."""
    return (None if ids is None else (jnp.min(ids), jnp.max(ids)),
            None if pfx is None else jnp.max(pfx))


def _loop(step, carry, lo, hi, *, masked: bool, load=None, live=None):
    """carry = step(n, carry, masked, *load(n)) for blocks n in [lo, hi); with `live`, a block
    for which live(n, *load(n)) is False is skipped (lax.cond)."""
    if live is None:
        return lax.fori_loop(lo, hi, lambda n, c: step(n, c, masked, *load(n)), carry)

    def checked(n, c):
        extra = load(n)
        return lax.cond(live(n, *extra), lambda c: step(n, c, masked, *extra), lambda c: c, c)

    return lax.fori_loop(lo, hi, checked, carry)


def _over_kv_blocks(step, carry, *, i: jax.Array, block_q: int, block_kv: int,
                    kv_len_valid: int, causal: bool, q_ids, q_pfx, ks_ref, kp_ref):
    """Forward / dQ: carry = step(j, carry, masked, k_ids, k_pfx) over the kv blocks j that
    q block i may attend. Blocks below the causal diagonal inside the real length need no mask
    and run first; the rest run masked, each checked with `block_may_attend` when segment ids
    or the prefix can rule it out. Blocks past the diagonal are visited only by a q block
    holding prefix positions."""
    q_first, q_last = i * block_q, (i + 1) * block_q - 1
    n_kv = -(-kv_len_valid // block_kv)  # blocks holding at least one real key
    hi = n_kv
    n_full = 0 if q_ids is not None else kv_len_valid // block_kv
    if causal:
        hi = jnp.minimum(_cdiv(q_last + 1, block_kv), n_kv)
        n_full = jnp.minimum(lax.div(q_first + 1, block_kv), n_full)
        if q_pfx is not None:
            hi = jnp.where(jnp.max(q_pfx) > 0, n_kv, hi)

    def load(j):
        kv_slice = pl.ds(j * block_kv, block_kv)
        return (None if ks_ref is None else ks_ref[kv_slice],
                None if kp_ref is None else kp_ref[kv_slice])

    carry = _loop(step, carry, 0, n_full, masked=False, load=lambda j: (None, None))
    live = None
    if q_ids is not None or q_pfx is not None:
        (q_range, q_has) = _summary(q_ids, q_pfx)

        def live(j, k_ids, k_pfx):
            k_range, k_has = _summary(k_ids, k_pfx)
            return block_may_attend(q_first, q_last, j * block_kv, causal=causal, q_ids=q_range,
                                    k_ids=k_range, q_prefix=q_has, k_prefix=k_has)

    return _loop(step, carry, n_full, hi, masked=True, load=load, live=live)


def _over_q_blocks(step, carry, *, j: jax.Array, block_q: int, block_kv: int, n_q: int,
                   causal: bool, k_ids, k_pfx, qs_ref, qp_ref):
    """dK/dV: carry = step(i, carry, masked, q_ids, q_pfx) over the q blocks i < n_q that see
    kv block j: the masked ones (diagonal, prefix, segments; checked like `_over_kv_blocks`)
    first, then those below the diagonal that need no mask."""
    k_first, k_last = j * block_kv, (j + 1) * block_kv - 1
    lo, full_from = 0, 0
    if causal:
        lo = lax.div(k_first, block_q)
        full_from = jnp.minimum(_cdiv(k_last, block_q), n_q)
        if k_pfx is not None:
            lo = jnp.where(jnp.max(k_pfx) > 0, 0, lo)
    if k_ids is not None:
        full_from = n_q

    def load(i):
        q_slice = pl.ds(i * block_q, block_q)
        return (None if qs_ref is None else qs_ref[q_slice],
                None if qp_ref is None else qp_ref[q_slice])

    live = None
    if k_ids is not None or k_pfx is not None:
        (k_range, k_has) = _summary(k_ids, k_pfx)

        def live(i, q_ids, q_pfx):
            q_range, q_has = _summary(q_ids, q_pfx)
            return block_may_attend(i * block_q, (i + 1) * block_q - 1, k_first, causal=causal,
                                    q_ids=q_range, k_ids=k_range, q_prefix=q_has,
                                    k_prefix=k_has)

    carry = _loop(step, carry, lo, full_from, masked=True, load=load, live=live)
    return _loop(step, carry, full_from, n_q, masked=False, load=lambda i: (None, None))


def _split(refs, has_segments: bool, has_prefix: bool, n_in: int):
    """(inputs, (q ids, kv ids), (q prefix, kv prefix), outputs); absent optional refs None."""
    ins, rest = refs[:n_in], refs[n_in:]
    ids, rest = (rest[:2], rest[2:]) if has_segments else ((None, None), rest)
    pfx, rest = (rest[:2], rest[2:]) if has_prefix else ((None, None), rest)
    return ins, ids, pfx, rest


def _fwd_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, has_prefix: bool,
                kv_len_valid: int, block_q: int, block_kv: int):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (qp_ref, kp_ref), (o_ref, lse_ref) = _split(
        refs, has_segments, has_prefix, 3)
    i = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    q = q_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_ids = qs_ref[...] if has_segments else None
    q_pfx = qp_ref[...] if has_prefix else None
    kv_len_mask = kv_len_valid if kv_len_valid % block_kv else None

    def step(j, carry, masked: bool, k_ids=None, k_pfx=None):
        acc, m, l = carry
        kv_slice = pl.ds(j * block_kv, block_kv)
        s = lax.dot_general(q, k_ref[kv_slice, :], _NT,
                            preferred_element_type=jnp.float32) * (sm_scale * LOG2E)
        if masked:
            s = _mask_scores(s, q_pos, j * block_kv + jnp.arange(block_kv), causal=causal,
                             kv_len=kv_len_mask, q_ids=q_ids, k_ids=k_ids, q_pfx=q_pfx,
                             k_pfx=k_pfx)
        m, l, acc = online_softmax_step(m, l, acc, s, v_ref[kv_slice, :], exp=jnp.exp2)
        return acc, m, l

    m, l, acc = online_softmax_init((block_q,), (block_q, head_dim))
    acc, m, l = _over_kv_blocks(step, (acc, m, l), i=i, block_q=block_q, block_kv=block_kv,
                                kv_len_valid=kv_len_valid, causal=causal, q_ids=q_ids,
                                q_pfx=q_pfx, ks_ref=ks_ref, kp_ref=kp_ref)
    out, lse = online_softmax_finish(m, l, acc, log=jnp.log2)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _num_warps(blocks: BlockSizes, head_dim: int) -> int:
    return blocks.num_warps or (4 if head_dim <= 64 else 8)


def _row_inputs(q_seg, kv_seg, q_pfx, kv_pfx, q_spec, kv_spec):
    """Segment ids and prefix flags ([batch, len] int32) with their BlockSpecs."""
    specs, args = [], []
    for q_x, kv_x in ((q_seg, kv_seg), (q_pfx, kv_pfx)):
        if q_x is not None:
            specs += [q_spec, kv_spec]
            args += [q_x, kv_x]
    return specs, args


def forward(q, k, v, q_seg, kv_seg, q_pfx, kv_pfx, *, sm_scale: float, causal: bool,
            kv_len_valid: int, blocks: BlockSizes, interpret: bool):
    """Returns (out [batch, q_len, heads, head_dim], lse [batch, heads, q_len] fp32, base 2)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = blocks.block_q, blocks.block_kv
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal,
                               has_segments=q_seg is not None, has_prefix=q_pfx is not None,
                               kv_len_valid=kv_len_valid, block_q=bq, block_kv=bk)
    row_specs, row_args = _row_inputs(q_seg, kv_seg, q_pfx, kv_pfx,
                                      pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                                      pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)))
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
        *row_specs,
    ]
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
    )(q, k, v, *row_args)


def _dq_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, has_prefix: bool,
               kv_len_valid: int, block_q: int, block_kv: int):
    ins, (qs_ref, ks_ref), (qp_ref, kp_ref), (dq_ref,) = _split(
        refs, has_segments, has_prefix, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_ids = qs_ref[...] if has_segments else None
    q_pfx = qp_ref[...] if has_prefix else None
    kv_len_mask = kv_len_valid if kv_len_valid % block_kv else None

    def step(j, dq, masked: bool, k_ids=None, k_pfx=None):
        kv_slice = pl.ds(j * block_kv, block_kv)
        k = k_ref[kv_slice, :]
        v = v_ref[kv_slice, :]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * (sm_scale * LOG2E)
        if masked:
            s = _mask_scores(s, q_pos, j * block_kv + jnp.arange(block_kv), causal=causal,
                             kv_len=kv_len_mask, q_ids=q_ids, k_ids=k_ids, q_pfx=q_pfx,
                             k_pfx=k_pfx)
        p = jnp.exp2(s - lse[:, None])
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = _over_kv_blocks(step, jnp.zeros(q.shape, jnp.float32), i=i, block_q=block_q,
                         block_kv=block_kv, kv_len_valid=kv_len_valid, causal=causal,
                         q_ids=q_ids, q_pfx=q_pfx, ks_ref=ks_ref, kp_ref=kp_ref)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, sm_scale: float, causal: bool, has_segments: bool, has_prefix: bool,
                q_len_valid: int, groups: int, block_q: int, block_kv: int):
    ins, (qs_ref, ks_ref), (qp_ref, kp_ref), (dk_ref, dv_ref) = _split(
        refs, has_segments, has_prefix, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    k_pos = j * block_kv + jnp.arange(block_kv)
    k_ids = ks_ref[...] if has_segments else None
    k_pfx = kp_ref[...] if has_prefix else None
    n_q = -(-q_len_valid // block_q)  # padded q rows carry dO = 0, whole padded blocks skip

    def step(i, carry, masked: bool, q_ids=None, q_pfx=None, g=0):
        dk, dv = carry
        q_slice = pl.ds(i * block_q, block_q)
        q = q_ref[q_slice, g, :]
        do = do_ref[q_slice, g, :]
        lse = lse_ref[g, q_slice]
        delta = delta_ref[g, q_slice]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * (sm_scale * LOG2E)
        if masked:  # kv padding needs no mask here: those dk/dv rows are sliced away
            s = _mask_scores(s, i * block_q + jnp.arange(block_q), k_pos, causal=causal,
                             kv_len=None, q_ids=q_ids, k_ids=k_ids, q_pfx=q_pfx, k_pfx=k_pfx)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN,
                                  preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
        return dk, dv

    def group_loop(g, carry):
        return _over_q_blocks(functools.partial(step, g=g), carry, j=j, block_q=block_q,
                              block_kv=block_kv, n_q=n_q, causal=causal, k_ids=k_ids,
                              k_pfx=k_pfx, qs_ref=qs_ref, qp_ref=qp_ref)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, group_loop, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, q_pfx, kv_pfx, lse, delta, do, *, sm_scale: float,
             causal: bool, q_len_valid: int, kv_len_valid: int, blocks: BlockSizes,
             interpret: bool):
    """Returns (dq, dk, dv) shaped like q, k, v. `lse` is the forward's base-2 logsumexp,
    delta [b, h, q_len] = rowsum(out * do)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    flags = dict(has_segments=q_seg is not None, has_prefix=q_pfx is not None)
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
    row_specs, row_args = _row_inputs(q_seg, kv_seg, q_pfx, kv_pfx,
                                      pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                                      pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)))
    in_specs += row_specs
    args = [q, k, v, do, lse, delta, *row_args]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, causal=causal,
                          kv_len_valid=kv_len_valid, block_q=bq, block_kv=bk, **flags),
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
    row_specs, row_args = _row_inputs(q_seg, kv_seg, q_pfx, kv_pfx,
                                      pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
                                      pl.BlockSpec((None, bk), lambda j, b, h: (b, j)))
    in_specs += row_specs
    args = [q, k, v, do, lse, delta, *row_args]
    kv_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, causal=causal,
                          q_len_valid=q_len_valid, groups=groups, block_q=bq, block_kv=bk,
                          **flags),
        grid=(kv_len // bk, batch, kv_heads),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv
