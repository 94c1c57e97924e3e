"""Blocked online-softmax attention (`llm.kernels.blocked`, attention_impl="xla_blocked") against
the plain-jnp reference: forward and gradients, causal / bidirectional / cross, packed segments,
prefix-LM, GQA/MQA, padded lengths, empty rows; memory linear in the sequence length; and the
"auto" dispatch on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.kernels.blocked import block_schedule, blocked_attention
from llm.kernels.reference import mha_reference
from llm.model import transformer
from llm.model.attention import AUTO_BLOCKED_MIN_LEN, prefix_lm_mask, resolve_impl
from llm.model.config import ModelConfig


def _inputs(b, q_len, kv_len, heads, kv_heads, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, q_len, heads, d), dtype)
    k = jax.random.normal(ks[1], (b, kv_len, kv_heads, d), dtype)
    v = jax.random.normal(ks[2], (b, kv_len, kv_heads, d), dtype)
    w = jax.random.normal(ks[3], (b, q_len, heads, d), jnp.float32)  # output cotangent
    return q, k, v, w


# Packed rows: three documents, then two documents and padding (segment 0 is padding too: it
# attends only to itself, as the data pipeline's padding does).
SEG = np.array([[1] * 9 + [2] * 14 + [3] * 13, [4] * 20 + [5] * 10 + [0] * 6], np.int32)
PREFIX = np.array([[1] * 5 + [0] * 31, [1] * 17 + [0] * 19], np.int32)

CASES = {
    # name: (q_len, kv_len, heads, kv_heads, reference kwargs, blocked kwargs)
    "causal": (36, 36, 4, 4, dict(causal=True), dict(causal=True)),
    "causal_packed_gqa": (36, 36, 4, 2, dict(causal=True, q_segment_ids=SEG, kv_segment_ids=SEG),
                          dict(causal=True, q_segment_ids=SEG, kv_segment_ids=SEG)),
    "bidirectional_packed_mqa": (36, 36, 4, 1,
                                 dict(causal=False, q_segment_ids=SEG, kv_segment_ids=SEG),
                                 dict(causal=False, q_segment_ids=SEG, kv_segment_ids=SEG)),
    "prefix_lm_packed": (36, 36, 4, 2,
                         dict(causal=False, q_segment_ids=SEG, kv_segment_ids=SEG,
                              mask=prefix_lm_mask(jnp.asarray(PREFIX))),
                         dict(causal=True, q_segment_ids=SEG, kv_segment_ids=SEG,
                              prefix=PREFIX)),
    # Cross-attention, lengths not multiples of the blocks; a query segment (7) with no key of
    # its own segment must give 0, as in the reference.
    "cross_ragged_empty_rows": (
        20, 36, 4, 2,
        dict(causal=False, q_segment_ids=np.array([[1] * 10 + [2] * 10, [4] * 15 + [7] * 5]),
             kv_segment_ids=SEG),
        dict(causal=False, q_segment_ids=np.array([[1] * 10 + [2] * 10, [4] * 15 + [7] * 5]),
             kv_segment_ids=SEG)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_grads_match_reference(name):
    q_len, kv_len, heads, kv_heads, ref_kw, kw = CASES[name]
    q, k, v, w = _inputs(2, q_len, kv_len, heads, kv_heads, 8)

    def loss(fn, **fkw):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(fn(q, k, v, **fkw) * w), argnums=(0, 1, 2)))

    ref_out = mha_reference(q, k, v, **ref_kw)
    # Blocks of 16 queries x 8 keys: several blocks per row, a padded last block, and (causal)
    # skipped blocks above the diagonal.
    out = blocked_attention(q, k, v, block_q=16, block_k=8, **kw)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    (ref_l, ref_g), (l, g) = loss(mha_reference, **ref_kw)(q, k, v), \
        loss(blocked_attention, block_q=16, block_k=8, **kw)(q, k, v)
    np.testing.assert_allclose(l, ref_l, rtol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    if name == "cross_ragged_empty_rows":
        assert np.all(np.asarray(out)[1, 15:] == 0.0)


def test_bf16_matches_reference():
    q, k, v, _ = _inputs(2, 36, 36, 4, 2, 8, jnp.bfloat16)
    ref = mha_reference(q, k, v, causal=True, q_segment_ids=SEG, kv_segment_ids=SEG)
    out = blocked_attention(q, k, v, causal=True, q_segment_ids=SEG, kv_segment_ids=SEG,
                            block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=3e-2)


def test_causal_schedule_skips_the_masked_blocks():
    qi, kj = block_schedule(4, 4, 64, 64, causal_skip=True)
    assert sorted(zip(qi.tolist(), kj.tolist())) == [(i, j) for i in range(4) for j in range(i + 1)]
    qi, kj = block_schedule(2, 4, 64, 32, causal_skip=True)  # key blocks half the size
    assert sorted(zip(qi.tolist(), kj.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2),
                                                     (1, 3)]
    assert len(block_schedule(3, 3, 8, 8, causal_skip=False)[0]) == 9


def _grad_temp_bytes(fn, seq):
    q, k, v, _ = _inputs(1, seq, seq, 2, 2, 16)
    grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v, causal=True).sum(), argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_sequence_length():
    """XLA's temporaries for forward + backward: the reference's grow 3-4x per doubling (the
    [seq, seq] scores and probabilities), the blocked one's ~2x (one block of scores)."""
    blocked = [_grad_temp_bytes(blocked_attention, s) for s in (1024, 2048, 4096)]
    ref = [_grad_temp_bytes(mha_reference, s) for s in (1024, 2048)]
    assert ref[1] / ref[0] > 3.0
    assert blocked[1] / blocked[0] < 2.2 and blocked[2] / blocked[1] < 2.2
    assert blocked[2] < ref[1] / 8  # twice as long, and still far below the reference


def test_auto_picks_blocked_on_cpu_for_long_sequences():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto", AUTO_BLOCKED_MIN_LEN, AUTO_BLOCKED_MIN_LEN) == "xla_blocked"
    assert resolve_impl("auto", 64, 64) == "xla"
    assert resolve_impl("xla", 4096, 4096) == "xla"
    assert ModelConfig().attention_impl == "auto"


def test_model_logits_and_grads_equal_with_either_impl():
    """The decoder with xla_blocked equals the decoder with xla (packed rows, GQA, RoPE)."""
    kw = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
              init_std=0.2)
    cfg_ref = ModelConfig(**kw, attention_impl="xla")
    cfg_blk = ModelConfig(**kw, attention_impl="xla_blocked")
    graphdef, params = transformer.init(cfg_ref, jax.random.key(1))
    graphdef_blk, _ = transformer.init(cfg_blk, jax.random.key(1))
    inputs = jax.random.randint(jax.random.key(2), (2, 36), 0, 97)
    positions = jnp.asarray(np.concatenate([np.arange(9), np.arange(14), np.arange(13)])[None]
                            .repeat(2, 0))

    def loss(g):
        return jax.jit(jax.value_and_grad(lambda p: transformer.apply(
            g, p, inputs, positions=positions, segment_ids=jnp.asarray(SEG)).sum()))

    (l_ref, g_ref), (l_blk, g_blk) = loss(graphdef)(params), loss(graphdef_blk)(params)
    np.testing.assert_allclose(l_blk, l_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_split_loops_are_bitwise_equal():
    """splits=2 (independent block loops over batch or kv-head slices, for XLA:CPU's threads)
    gives bitwise the same output and gradients as one loop, with packed rows and a prefix.
    One row, so the kv heads are split (per-row ids shared by both halves)."""
    batch = 1
    q, k, v, w = _inputs(batch, 36, 36, 4, 2, 8)
    kw = dict(causal=True, q_segment_ids=SEG[:batch], kv_segment_ids=SEG[:batch],
              prefix=PREFIX[:batch], block_q=16, block_k=8)

    def run(splits):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(
            blocked_attention(q, k, v, splits=splits, **kw) * w), argnums=(0, 1, 2)))(q, k, v)

    (l1, g1), (l2, g2) = run(1), run(2)
    assert l1 == l2
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)
