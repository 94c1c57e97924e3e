"""Pieces every attention kernel shares, written once: the block-skip tests and the
online-softmax update.

They are plain jnp on values, so the same code runs inside the Triton and Mosaic kernels (and
in the wrappers that plan which blocks an index map fetches). What is masked is defined once,
elementwise, by `llm.kernels.reference.allowed`; the block tests here are its consequences for
a whole (query block, key block) tile, derived from per-block summaries (first/last position,
segment-id range, whether the block holds prefix-LM positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm.kernels.reference import MASK_VALUE


def block_may_attend(q_first, q_last, k_first, *, causal: bool, q_len=None, kv_len=None,
                     q_ids=None, k_ids=None, q_prefix=None, k_prefix=None):
    """False only when `allowed` is False for every (query, key) pair of the tile, so the
    tile can be skipped. Queries sit at q_first..q_last, keys from k_first on.

    q_len / kv_len: real (unpadded) lengths; a block starting past them holds no real rows.
    q_ids / k_ids: (min, max) segment id of each block; tiles whose ranges cannot meet skip.
    q_prefix / k_prefix: whether each block holds prefix-LM positions (nonzero = yes); above
    the causal diagonal only a tile with prefix on both sides can see anything.
    """
    run = jnp.bool_(True)
    if q_len is not None:
        run = run & (q_first < q_len)
    if kv_len is not None:
        run = run & (k_first < kv_len)
    if causal:
        visible = q_last >= k_first
        if q_prefix is not None:
            visible = visible | ((q_prefix > 0) & (k_prefix > 0))
        run = run & visible
    if q_ids is not None:
        run = run & (k_ids[0] <= q_ids[1]) & (k_ids[1] >= q_ids[0])
    return run


def block_needs_mask(q_first, k_last, *, causal: bool, kv_len=None, segments: bool = False):
    """False when `allowed` is True for every pair of a tile that runs, so the mask can be
    left out: below the causal diagonal (the prefix only adds visibility) and inside the real
    kv length. Segment ids always need the mask."""
    needs = jnp.bool_(segments)
    if causal:
        needs = needs | (k_last > q_first)
    if kv_len is not None:
        needs = needs | (k_last >= kv_len)
    return needs


def _col(x: jax.Array) -> jax.Array:
    """A per-row statistic as a column: [rows] -> [rows, 1]; [rows, lanes] -> [rows, 1]
    (Mosaic keeps row statistics lane-replicated in [rows, 128] scratch)."""
    return x[:, None] if x.ndim == 1 else x[:, 0:1]


def _row_reduce(fn, s: jax.Array, like: jax.Array) -> jax.Array:
    return fn(s, axis=1) if like.ndim == 1 else fn(s, axis=1, keepdims=True)


def online_softmax_init(stat_shape: tuple[int, ...], acc_shape: tuple[int, ...]):
    """Empty running softmax: (m = -inf, l = 0) of stat_shape, acc = 0 of acc_shape, fp32."""
    return (jnp.full(stat_shape, -jnp.inf, jnp.float32), jnp.zeros(stat_shape, jnp.float32),
            jnp.zeros(acc_shape, jnp.float32))


def online_softmax_step(m, l, acc, s, v, *, exp=jnp.exp):
    """Fold one key block into the running softmax of a row tile.

    m, l: running row max and row sum, [rows] or [rows, lanes] fp32 (lanes equal);
    acc: [rows, head_dim] fp32, the unnormalised output; s: [rows, block] fp32 scores, masked
    entries at MASK_VALUE; v: [block, head_dim]. exp: jnp.exp, or jnp.exp2 when the scores
    are pre-scaled by log2(e). Probabilities are cast to v's dtype for the matmul.
    Returns the new (m, l, acc).
    """
    m_new = jnp.maximum(m, _row_reduce(jnp.max, s, m))
    alpha = exp(m - m_new)
    p = exp(s - _col(m_new))
    l_new = alpha * l + _row_reduce(jnp.sum, p, m)
    acc_new = acc * _col(alpha) + jnp.dot(p.astype(v.dtype), v,
                                          preferred_element_type=jnp.float32)
    return m_new, l_new, acc_new


def online_softmax_finish(m, l, acc, *, log=jnp.log, empty_lse: float = float("inf")):
    """(out [rows, head_dim] fp32, lse like m). Rows that saw no allowed key (m never rose
    above MASK_VALUE) give out 0, like the reference, and lse = empty_lse (+inf makes the
    backward's exp(s - lse) vanish; -inf gives a flash-decoding split zero weight)."""
    valid = m > MASK_VALUE
    l_safe = jnp.where(valid, l, 1.0)
    out = jnp.where(_col(valid), acc / _col(l_safe), 0.0)
    return out, jnp.where(valid, m + log(l_safe), empty_lse)
