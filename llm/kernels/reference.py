"""Plain-jnp attention, written for clarity. It is the `xla` implementation and the reference
every Pallas kernel is tested against.

Shapes:
  q: [batch, q_len, num_heads, head_dim]
  k, v: [batch, kv_len, num_kv_heads, head_dim], num_heads % num_kv_heads == 0 (GQA/MQA)
  q_segment_ids: [batch, q_len], kv_segment_ids: [batch, kv_len] int32; a query attends to a key
    only when their segment ids are equal. None means one segment.
  q_offset: for causal masking, query i sits at absolute position q_offset + i (decode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_len: int, kv_len: int, *, causal: bool, q_segment_ids=None,
                   kv_segment_ids=None, q_offset: int = 0) -> jax.Array | None:
    """Boolean mask [batch or 1, 1, q_len, kv_len], True where attention is allowed."""
    mask = None
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + q_offset
        mask = (q_pos >= jnp.arange(kv_len)[None, :])[None, None]
    if q_segment_ids is not None:
        seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        mask = seg if mask is None else mask & seg
    return mask


def mha_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None,
                  kv_segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                  q_offset: int = 0, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention. Returns [batch, q_len, num_heads, head_dim] in q's dtype.

    Scores and softmax are fp32. `mask` ([batch or 1, 1, q_len, kv_len], True = keep) is
    combined with the causal and segment masks. Fully masked rows return zeros.
    """
    b, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    groups = num_heads // num_kv_heads
    qg = q.reshape(b, q_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, num_heads, q_len, kv_len) * sm_scale
    full = attention_mask(q_len, kv_len, causal=causal, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, q_offset=q_offset)
    if mask is not None:
        full = mask if full is None else full & mask
    if full is not None:
        scores = jnp.where(full, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if full is not None:
        probs = jnp.where(full, probs, 0.0)  # rows with no allowed key give 0, not a uniform mix
    probs = probs.reshape(b, num_kv_heads, groups, q_len, kv_len).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, q_len, num_heads, head_dim).astype(q.dtype)


def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               lengths: jax.Array, *, sm_scale: float | None = None) -> jax.Array:
    """Attention of a few new tokens against a KV cache, per-sequence valid length.

    q: [batch, q_len, num_heads, head_dim], the last q_len tokens of each sequence's valid
    prefix; k_cache, v_cache: [batch, max_len, num_kv_heads, head_dim]; lengths: [batch] int,
    valid cache length (it includes the q_len new tokens). Query t of sequence b sits at
    position lengths[b] - q_len + t and attends cache positions <= that (causal among the new
    tokens; everything at or past lengths[b] is ignored). Returns [batch, q_len, num_heads,
    head_dim] in q's dtype; a query whose position is negative (lengths[b] < q_len) gives 0.
    """
    q_len, max_len = q.shape[1], k_cache.shape[1]
    q_pos = lengths[:, None] - q_len + jnp.arange(q_len)[None, :]  # [batch, q_len]
    mask = jnp.arange(max_len)[None, None, :] <= q_pos[:, :, None]  # [batch, q_len, max_len]
    return mha_reference(q, k_cache, v_cache, causal=False, sm_scale=sm_scale,
                         mask=mask[:, None])
