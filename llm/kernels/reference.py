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


def allowed(q_pos, k_pos, *, causal: bool, q_ids=None, k_ids=None, q_prefix=None,
            k_prefix=None, kv_len=None):
    """The one definition of the attention mask, elementwise: True where query q may see key k.

    Every argument is an array (or scalar) of query or key attributes, broadcast against each
    other, so the same predicate builds the full [q_len, kv_len] mask here and a tile's mask
    inside each Pallas kernel (positions from iotas, ids from the tile's refs):
      causal:   k_pos <= q_pos, or (prefix-LM) both positions are in the prefix
                (q_prefix, k_prefix nonzero): the prefix sees itself bidirectionally;
      q_ids / k_ids: segment ids, equal ids only (packed documents never see each other);
      kv_len:   keys at k_pos >= kv_len do not exist (padding, or past a KV cache's end).
    """
    ok = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        visible = q_pos >= k_pos
        if q_prefix is not None:
            visible = visible | ((q_prefix > 0) & (k_prefix > 0))
        ok = both(ok, visible)
    if kv_len is not None:
        ok = both(ok, k_pos < kv_len)
    if q_ids is not None:
        ok = both(ok, q_ids == k_ids)
    return ok


def attention_mask(q_len: int, kv_len: int, *, causal: bool, q_segment_ids=None,
                   kv_segment_ids=None, q_offset: int | jax.Array = 0,
                   prefix=None) -> jax.Array | None:
    """Boolean mask [batch or 1, 1, q_len, kv_len], True where attention is allowed (`allowed`).

    q_offset: query i sits at position q_offset + i (scalar, or [batch] per sequence).
    prefix: [batch, len] (self-attention, q_len == kv_len), nonzero on prefix-LM positions.
    """
    if not causal and q_segment_ids is None:
        return None
    q_pos = (jnp.reshape(jnp.asarray(q_offset), (-1, 1, 1, 1))
             + jnp.arange(q_len)[None, None, :, None])
    k_pos = jnp.arange(kv_len)[None, None, None, :]
    seg = {}
    if q_segment_ids is not None:
        seg = dict(q_ids=q_segment_ids[:, None, :, None], k_ids=kv_segment_ids[:, None, None, :])
    pfx = {}
    if prefix is not None:
        pfx = dict(q_prefix=prefix[:, None, :, None], k_prefix=prefix[:, None, None, :])
    return allowed(q_pos, k_pos, causal=causal, **seg, **pfx)


def mha_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids=None,
                  kv_segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                  q_offset: int = 0, prefix: jax.Array | None = None,
                  mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention. Returns [batch, q_len, num_heads, head_dim] in q's dtype.

    Scores and softmax are fp32. prefix ([batch, len], causal self-attention): prefix-LM, the
    positions marked nonzero see each other bidirectionally. `mask` ([batch or 1, 1, q_len,
    kv_len], True = keep) is combined with the causal, prefix and segment masks. Fully masked
    rows return zeros.
    """
    b, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if prefix is not None and (not causal or q_len != kv_len):
        raise ValueError("a prefix-LM mask needs causal=True self-attention (q_len == kv_len)")
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    groups = num_heads // num_kv_heads
    qg = q.reshape(b, q_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, num_heads, q_len, kv_len) * sm_scale
    full = attention_mask(q_len, kv_len, causal=causal, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, q_offset=q_offset, prefix=prefix)
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
    mask = attention_mask(q_len, max_len, causal=True, q_offset=lengths - q_len)
    return mha_reference(q, k_cache, v_cache, causal=False, sm_scale=sm_scale, mask=mask)
