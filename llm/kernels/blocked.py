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
    fp32. Nothing of size q_len x kv_len is ever live: memory is linear in the sequence length
    (one block of scores [batch, kv_heads, groups, block_q, block_k] at a time).

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


def _blocks(x, idx, size):
    return jax.lax.dynamic_slice_in_dim(x, idx * size, size, 1)


def _scores(qb, kb, scale):
    """qb [b, bq, kvh, g, d], kb [b, bk, kvh, d] -> fp32 [b, kvh, g, bq, bk]."""
    return jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, *, causal, scale, block_q, block_k,
             check):
    """Padded inputs; q [b, Sq, kvh, g, d]. Returns out [b, Sq, kvh, g, d] (q.dtype), lse."""
    b, sq, kvh, g, d = q.shape
    qi, kj = block_schedule(sq // block_q, k.shape[1] // block_k, block_q, block_k,
                            causal_skip=causal and prefix_q is None)
    mask_fn = functools.partial(_block_mask, block_q=block_q, block_k=block_k, causal=causal,
                                q_seg=q_seg, kv_seg=kv_seg, prefix_q=prefix_q, prefix_k=prefix_k)

    def step(carry, ij):
        i, j = ij
        mask = mask_fn(i, j)

        def compute(carry):
            acc, m, l = carry
            s = jnp.where(mask, _scores(_blocks(q, i, block_q), _blocks(k, j, block_k), scale),
                          MASK_VALUE)
            m_old = jax.lax.dynamic_slice_in_dim(m, i * block_q, block_q, 3)
            l_old = jax.lax.dynamic_slice_in_dim(l, i * block_q, block_q, 3)
            m_new = jnp.maximum(m_old, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m_old - m_new)
            l_new = alpha * l_old + p.sum(-1)
            pv = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), _blocks(v, j, block_k),
                            preferred_element_type=jnp.float32)
            a_old = _blocks(acc, i, block_q)
            a_new = a_old * jnp.moveaxis(alpha, 3, 1)[..., None] + pv
            acc = jax.lax.dynamic_update_slice_in_dim(acc, a_new, i * block_q, 1)
            m = jax.lax.dynamic_update_slice_in_dim(m, m_new, i * block_q, 3)
            l = jax.lax.dynamic_update_slice_in_dim(l, l_new, i * block_q, 3)
            return acc, m, l

        if check:
            carry = jax.lax.cond(mask.any(), compute, lambda c: c, carry)
        else:
            carry = compute(carry)
        return carry, None

    init = (jnp.zeros((b, sq, kvh, g, d), jnp.float32),
            jnp.full((b, kvh, g, sq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kvh, g, sq), jnp.float32))
    (acc, m, l), _ = jax.lax.scan(step, init, (qi, kj))
    l_safe = jnp.where(l == 0.0, 1.0, l)  # rows with no allowed key: output 0
    out = acc / jnp.moveaxis(l_safe, 3, 1)[..., None]
    lse = m + jnp.log(l_safe)
    return out.astype(q.dtype), lse


def _backward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse, dout, *, causal, scale,
              block_q, block_k, check):
    """FlashAttention-2 backward over the same schedule: recompute p per block from lse."""
    sq = q.shape[1]
    qi, kj = block_schedule(sq // block_q, k.shape[1] // block_k, block_q, block_k,
                            causal_skip=causal and prefix_q is None)
    mask_fn = functools.partial(_block_mask, block_q=block_q, block_k=block_k, causal=causal,
                                q_seg=q_seg, kv_seg=kv_seg, prefix_q=prefix_q, prefix_k=prefix_k)
    # D_i = rowsum(dO_i * O_i) [b, kvh, g, Sq]
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

    def step(carry, ij):
        i, j = ij
        mask = mask_fn(i, j)

        def compute(carry):
            dq, dk, dv = carry
            qb, kb, vb = _blocks(q, i, block_q), _blocks(k, j, block_k), _blocks(v, j, block_k)
            dob = _blocks(dout, i, block_q)
            lse_b = jax.lax.dynamic_slice_in_dim(lse, i * block_q, block_q, 3)
            delta_b = jax.lax.dynamic_slice_in_dim(delta, i * block_q, block_q, 3)
            s = _scores(qb, kb, scale)
            p = jnp.where(mask, jnp.exp(s - lse_b[..., None]), 0.0)
            dv_b = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), dob,
                              preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_b[..., None]) * scale).astype(q.dtype)
            dq_b = jnp.einsum("bkgqs,bskd->bqkgd", ds, kb, preferred_element_type=jnp.float32)
            dk_b = jnp.einsum("bkgqs,bqkgd->bskd", ds, qb, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _blocks(dq, i, block_q) + dq_b,
                                                     i * block_q, 1)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _blocks(dk, j, block_k) + dk_b,
                                                     j * block_k, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _blocks(dv, j, block_k) + dv_b,
                                                     j * block_k, 1)
            return dq, dk, dv

        if check:
            carry = jax.lax.cond(mask.any(), compute, lambda c: c, carry)
        else:
            carry = compute(carry)
        return carry, None

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
            jnp.zeros(v.shape, jnp.float32))
    (dq, dk, dv), _ = jax.lax.scan(step, init, (qi, kj))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _attention(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal, scale, block_q, block_k,
               check):
    return _forward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal=causal, scale=scale,
                    block_q=block_q, block_k=block_k, check=check)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal, scale, block_q, block_k,
                   check):
    out, lse = _forward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, causal=causal, scale=scale,
                        block_q=block_q, block_k=block_k, check=check)
    return out, (q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse)


def _attention_bwd(causal, scale, block_q, block_k, check, res, dout):
    q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, prefix_q, prefix_k, out, lse, dout,
                           causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                           check=check)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      q_segment_ids: jax.Array | None = None,
                      kv_segment_ids: jax.Array | None = None, causal: bool = True,
                      prefix: jax.Array | None = None, sm_scale: float | None = None,
                      block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K
                      ) -> jax.Array:
    """Attention equal to `mha_reference` (same arguments; `prefix` [batch, seq] instead of an
    arbitrary mask) with memory linear in the sequence length.

    q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] -> like q.
    Blocks are clipped to the (8-rounded) lengths, so short sequences run as one block.
    """
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
    qg = _pad(q, sq).reshape(b, sq, kv_heads, heads // kv_heads, head_dim)
    out = _attention(qg, _pad(k, skv), _pad(v, skv), q_segment_ids, kv_segment_ids, prefix_q,
                     prefix_k, causal, scale, block_q, block_k, check)
    return out.reshape(b, sq, heads, head_dim)[:, :q_len]
