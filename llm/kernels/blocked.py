"""Blocked online-softmax attention in plain jnp (the flash algorithm without Pallas), for CPU.

`mha_reference` materialises fp32 scores [batch, heads, q_len, kv_len] (and autodiff keeps the
probabilities for the backward), so its memory grows with seq^2 and it computes the causally
masked half. This computes the same function block by block:

  * queries in blocks of `block_q` rows, keys/values in blocks of `block_k`;
  * a static schedule of (query block, key block) pairs that leaves out the blocks a causal mask
    hides completely, walked by one `lax.scan`; with segment ids or a prefix-LM mask every
    scheduled pair is also checked on the data and skipped (`lax.cond`) when fully masked;
  * the forward keeps a running max m, a running sum l and an fp32 output accumulator per query
    row (online softmax) and saves only the output and lse = m + log l [batch, kv_heads, groups,
    q_len] for the backward;
  * the backward (`jax.custom_vjp`) walks the same pairs and recomputes each block's
    probabilities from q, k and lse -- FlashAttention-2's backward -- accumulating dq, dk, dv in
    fp32, with the block transposed (key-major p^T, ds^T), so dv = p^T dO and dk = ds^T q need
    no per-block transpose;
  * q, k, v are put in a heads-major layout once (q [batch, kv_heads, groups, q_len, head_dim],
    the softmax scale folded into q), so each block is a contiguous run of rows and each einsum
    one batched GEMM; before this, slicing blocks out of [batch, seq, heads, head_dim] cost a
    transposing copy per operand per pair (~25% of the attention's time at seq 2048).

Nothing of size q_len x kv_len is ever live: memory is linear in the sequence length (one block
of scores [batch, kv_heads, groups, block_q, block_k] at a time).

What is masked comes from `llm.kernels.reference.attention_mask` (causal with a query offset,
segment ids), applied per block, so there is one definition of the mask. Semantics equal
`mha_reference`: fp32 scores and softmax, probabilities cast to v's dtype for the PV product,
rows with no allowed key give 0.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] (GQA/MQA
when kv_heads < heads); segment ids [batch, q_len] / [batch, kv_len]; prefix [batch, seq]
(prefix-LM: positions marked 1 see each other bidirectionally, the rest is causal; self-attention
only). Lengths that are not a multiple of the block are padded; padded keys are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm.kernels.reference import MASK_VALUE, attention_mask

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128


def block_schedule(num_q: int, num_k: int, block_q: int, block_k: int, *,
                   causal_skip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(query block index, key block index) int32 arrays of the pairs to compute.

    causal_skip: leave out pairs whose every key lies after every query (key block start >
    last query of the block), i.e. fully hidden by the causal mask."""
    pairs = [(i, j) for i in range(num_q) for j in range(num_k)
             if not causal_skip or j * block_k <= (i + 1) * block_q - 1]
    qi, kj = zip(*pairs)
    return np.asarray(qi, np.int32), np.asarray(kj, np.int32)


def _pad(x: jax.Array, length: int, value=0) -> jax.Array:
    extra = length - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _block_mask(i, j, *, block_q: int, block_k: int, causal: bool, q_seg, kv_seg, prefix_q,
                prefix_k) -> jax.Array:
    """bool [batch or 1, 1, 1, block_q, block_k] for query block i x key block j, True = keep.

    causal and segments from `reference.attention_mask`; with a prefix, keys and queries both
    in the prefix are also allowed (causal | both-in-prefix, as `model.attention.prefix_lm_mask`).
    """
    qs = None if q_seg is None else jax.lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, 1)
    ks = None if kv_seg is None else jax.lax.dynamic_slice_in_dim(kv_seg, j * block_k, block_k, 1)
    # [1 or batch, 1, block_q, block_k]
    mask = attention_mask(block_q, block_k, causal=causal, q_offset=i * block_q - j * block_k)
    if prefix_q is not None:
        pq = jax.lax.dynamic_slice_in_dim(prefix_q, i * block_q, block_q, 1)
        pk = jax.lax.dynamic_slice_in_dim(prefix_k, j * block_k, block_k, 1)
        mask = mask | (pq[:, :, None] & pk[:, None, :])[:, None]
    if qs is not None:
        seg = attention_mask(block_q, block_k, causal=False, q_segment_ids=qs, kv_segment_ids=ks)
        mask = seg if mask is None else mask & seg
    if mask is None:
        mask = jnp.ones((1, 1, block_q, block_k), bool)
    return mask[:, :, None]  # broadcast over (kv_heads, groups)


def _rows(x, idx, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, idx * size, size, axis)


def _forward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, *, causal, block_q, block_k, check):
    """Padded inputs, heads-major: q [b, kvh, g, Sq, d] (already scaled), k/v [b, kvh, Skv, d].
    Returns out like q (q.dtype) and lse [b, kvh, g, Sq]."""
    sq = q.shape[3]
    qi, kj = block_schedule(sq // block_q, k.shape[2] // block_k, block_q, block_k,
                            causal_skip=causal and prefix_q is None)
    mask_fn = functools.partial(_block_mask, block_q=block_q, block_k=block_k, causal=causal,
                                q_seg=q_seg, kv_seg=kv_seg, prefix_q=prefix_q, prefix_k=prefix_k)

    def step(carry, ij):
        i, j = ij
        mask = mask_fn(i, j)

        def compute(carry):
            acc, m, l = carry
            # scores [b, kvh, g, bq, bk]: contiguous row blocks, one batched GEMM
            s = jnp.einsum("bkgqd,bksd->bkgqs", _rows(q, i, block_q, 3),
                           _rows(k, j, block_k, 2), preferred_element_type=jnp.float32)
            s = jnp.where(mask, s, MASK_VALUE)
            m_old = _rows(m, i, block_q, 3)
            m_new = jnp.maximum(m_old, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m_old - m_new)
            l_new = alpha * _rows(l, i, block_q, 3) + p.sum(-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), _rows(v, j, block_k, 2),
                            preferred_element_type=jnp.float32)
            a_new = _rows(acc, i, block_q, 3) * alpha[..., None] + pv
            acc = jax.lax.dynamic_update_slice_in_dim(acc, a_new, i * block_q, 3)
            m = jax.lax.dynamic_update_slice_in_dim(m, m_new, i * block_q, 3)
            l = jax.lax.dynamic_update_slice_in_dim(l, l_new, i * block_q, 3)
            return acc, m, l

        if check:
            carry = jax.lax.cond(mask.any(), compute, lambda c: c, carry)
        else:
            carry = compute(carry)
        return carry, None

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:4], MASK_VALUE, jnp.float32),
            jnp.zeros(q.shape[:4], jnp.float32))
    (acc, m, l), _ = jax.lax.scan(step, init, (qi, kj))
    l_safe = jnp.where(l == 0.0, 1.0, l)  # rows with no allowed key: output 0
    out = acc / l_safe[..., None]
    lse = m + jnp.log(l_safe)
    return out.astype(q.dtype), lse


def _backward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse, dout, *, causal, block_q,
              block_k, check):
    """FlashAttention-2 backward over the same schedule: recompute p per block from lse.

    Key-major blocks (p^T, ds^T [b, kvh, bk, g, bq]) so that dv = p^T dO, dk = ds^T q and
    dq^T = k^T ds^T are GEMMs on their operands' own layouts: no block is transposed.
    q is the scaled q of the forward; returns dq with respect to it."""
    sq = q.shape[3]
    qi, kj = block_schedule(sq // block_q, k.shape[2] // block_k, block_q, block_k,
                            causal_skip=causal and prefix_q is None)
    mask_fn = functools.partial(_block_mask, block_q=block_q, block_k=block_k, causal=causal,
                                q_seg=q_seg, kv_seg=kv_seg, prefix_q=prefix_q, prefix_k=prefix_k)
    # D_i = rowsum(dO_i * O_i) [b, kvh, g, Sq]
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))
    kt = k.transpose(0, 1, 3, 2)  # [b, kvh, d, Skv], for dq^T = k^T ds^T

    def step(carry, ij):
        i, j = ij
        mask = mask_fn(i, j)

        def compute(carry):
            dqt, dk, dv = carry
            qb, dob = _rows(q, i, block_q, 3), _rows(dout, i, block_q, 3)
            kb, vb = _rows(k, j, block_k, 2), _rows(v, j, block_k, 2)
            st = jnp.einsum("bksd,bkgqd->bksgq", kb, qb, preferred_element_type=jnp.float32)
            keep = jnp.moveaxis(mask, -1, 2)  # [., 1, bk, 1, bq]
            pt = jnp.where(keep, jnp.exp(st - _rows(lse, i, block_q, 3)[:, :, None]), 0.0)
            dv_b = jnp.einsum("bksgq,bkgqd->bksd", pt.astype(v.dtype), dob,
                              preferred_element_type=jnp.float32)
            dpt = jnp.einsum("bksd,bkgqd->bksgq", vb, dob, preferred_element_type=jnp.float32)
            dst = (pt * (dpt - _rows(delta, i, block_q, 3)[:, :, None])).astype(q.dtype)
            dk_b = jnp.einsum("bksgq,bkgqd->bksd", dst, qb, preferred_element_type=jnp.float32)
            dqt_b = jnp.einsum("bkds,bksgq->bkgdq", _rows(kt, j, block_k, 3), dst,
                               preferred_element_type=jnp.float32)
            dqt = jax.lax.dynamic_update_slice_in_dim(dqt, _rows(dqt, i, block_q, 4) + dqt_b,
                                                      i * block_q, 4)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _rows(dk, j, block_k, 2) + dk_b,
                                                     j * block_k, 2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _rows(dv, j, block_k, 2) + dv_b,
                                                     j * block_k, 2)
            return dqt, dk, dv

        if check:
            carry = jax.lax.cond(mask.any(), compute, lambda c: c, carry)
        else:
            carry = compute(carry)
        return carry, None

    b, kvh, g, _, d = q.shape
    init = (jnp.zeros((b, kvh, g, d, sq), jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))
    (dqt, dk, dv), _ = jax.lax.scan(step, init, (qi, kj))
    return (dqt.transpose(0, 1, 2, 4, 3).astype(q.dtype), dk.astype(k.dtype),
            dv.astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attention(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal, block_q, block_k, check):
    return _forward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal=causal,
                    block_q=block_q, block_k=block_k, check=check)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal, block_q, block_k, check):
    out, lse = _forward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal=causal,
                        block_q=block_q, block_k=block_k, check=check)
    return out, (q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse)


def _attention_bwd(causal, block_q, block_k, check, res, dout):
    q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse, dout,
                           causal=causal, block_q=block_q, block_k=block_k, check=check)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      q_segment_ids: jax.Array | None = None,
                      kv_segment_ids: jax.Array | None = None, causal: bool = True,
                      prefix: jax.Array | None = None, sm_scale: float | None = None,
                      block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                      splits: int = 1) -> jax.Array:
    """Attention equal to `mha_reference` (same arguments; `prefix` [batch, seq] instead of an
    arbitrary mask) with memory linear in the sequence length.

    q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] -> like q.
    Blocks are clipped to the (8-rounded) lengths, so short sequences run as one block.
    splits > 1: run `splits` independent block loops over equal slices of the batch (or, when
    the batch does not divide, of the kv heads), which XLA:CPU may execute concurrently on its
    threads instead of splitting each small block GEMM between them; rows are computed alike, so
    the result is bitwise the same (tests/kernels/test_blocked.py). Falls back to one loop when
    neither divides.
    """
    if splits > 1:
        axis = 0 if q.shape[0] % splits == 0 else 2 if k.shape[2] % splits == 0 else None
        if axis is not None:
            def part(x, i):
                if x is None:
                    return None
                if axis == 2 and x.ndim == 2:  # per-row ids/prefix are shared by head slices
                    return x
                return jnp.split(x, splits, axis=axis)[i]

            return jnp.concatenate([blocked_attention(
                part(q, i), part(k, i), part(v, i), q_segment_ids=part(q_segment_ids, i),
                kv_segment_ids=part(kv_segment_ids, i), causal=causal, prefix=part(prefix, i),
                sm_scale=sm_scale, block_q=block_q, block_k=block_k) for i in range(splits)],
                axis=axis)
    b, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if prefix is not None and (not causal or q_len != kv_len):
        raise ValueError("blocked_attention: a prefix-LM mask needs causal self-attention.")
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    block_q = min(block_q, -(-q_len // 8) * 8)
    block_k = min(block_k, -(-kv_len // 8) * 8)
    sq = -(-q_len // block_q) * block_q
    skv = -(-kv_len // block_k) * block_k
    check = q_segment_ids is not None or prefix is not None or skv != kv_len
    if skv != kv_len or sq != q_len:
        # Padded keys get a segment no query has; padded queries are sliced off at the end.
        if q_segment_ids is None:
            q_segment_ids = jnp.ones((b, q_len), jnp.int32)
            kv_segment_ids = jnp.ones((b, kv_len), jnp.int32)
        q_segment_ids = _pad(q_segment_ids.astype(jnp.int32), sq, -1)
        kv_segment_ids = _pad(kv_segment_ids.astype(jnp.int32), skv, -2)
    prefix_q = prefix_k = None
    if prefix is not None:
        prefix_q = _pad(prefix.astype(bool), sq, False)
        prefix_k = _pad(prefix.astype(bool), skv, False)
    # Heads-major layout once, so every block is a contiguous run of rows and each einsum one
    # batched GEMM: q [b, kv_heads, groups, Sq, d] (scale folded in), k/v [b, kv_heads, Skv, d].
    qt = (_pad(q, sq) * jnp.asarray(scale, q.dtype)).reshape(
        b, sq, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    kt = _pad(k, skv).transpose(0, 2, 1, 3)
    vt = _pad(v, skv).transpose(0, 2, 1, 3)
    out = _attention(qt, kt, vt, q_segment_ids, kv_segment_ids, prefix_q, prefix_k, causal,
                     block_q, block_k, check)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, sq, heads, head_dim)[:, :q_len]
