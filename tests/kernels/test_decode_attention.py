"""decode_attention vs decode_attention_reference on ragged KV caches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from llm.kernels import DecodeBlockSizes, decode_attention, decode_attention_reference
from llm.kernels.decode_attention import cache_block
from tests.kernels.helpers import BF16_TOL, FP32_TOL, assert_close, kernel_mode


def check_decode(backend, *, q_len, heads, kv_heads, head_dim, max_len, lengths, blocks,
                 dtype=jnp.float32, seed=0):
    batch = len(lengths)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    # Garbage past each sequence's length must be ignored (never read, or masked).
    past = jnp.arange(max_len)[None, :, None, None] >= lengths[:, None, None, None]
    k_dirty, v_dirty = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
    with kernel_mode(backend):
        out = jax.jit(lambda *a: decode_attention(*a, block_sizes=blocks, backend=backend))(
            q, k_dirty, v_dirty, lengths)
        want = decode_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close("decode out", out, want, FP32_TOL if dtype == jnp.float32 else BF16_TOL)


class TestDecodeAttentionGPU:
    backend = "gpu"

    def test_one_token_gqa_ragged_splits(self):
        # lengths hit: full cache, a single token, mid-block, exact block boundary.
        check_decode(self.backend, q_len=1, heads=8, kv_heads=2, head_dim=64, max_len=160,
                     lengths=[160, 1, 77, 64], blocks=DecodeBlockSizes(block_kv=32,
                                                                       num_splits=3))

    def test_prefill_mqa_row_tiles_short_sequence_gives_zero_rows(self):
        # q_len 20 x 4 heads = 80 rows in 5 tiles of 16 (a prefill through the cache);
        # lengths[1] = 2 < q_len: the first queries of that row have no key and return 0.
        check_decode(self.backend, q_len=20, heads=4, kv_heads=1, head_dim=128, max_len=96,
                     lengths=[96, 2, 50], blocks=DecodeBlockSizes(block_kv=16, num_splits=8,
                                                                  block_rows=16))

    def test_bf16_odd_cache_length(self):
        check_decode(self.backend, q_len=2, heads=4, kv_heads=4, head_dim=64, max_len=100,
                     lengths=[100, 33], blocks=DecodeBlockSizes(block_kv=64, num_splits=2),
                     dtype=jnp.bfloat16)


    def test_length_past_an_odd_cache_reads_no_padding(self):
        # Cache 100 with blocks of 32 is padded to 112 internally, with NaN: lengths past the
        # cache (130) must attend the 100 real positions only. Reading the padding would give
        # NaN (the old kernel read zero padding: error 0.18).
        check_decode(self.backend, q_len=2, heads=4, kv_heads=2, head_dim=64, max_len=100,
                     lengths=[130, 100, 7], blocks=DecodeBlockSizes(block_kv=32, num_splits=4))


class TestDecodeAttentionTPU:
    backend = "tpu"

    def test_length_past_an_odd_cache_reads_no_padding(self):
        # Cache 69 (a 5-token prompt + 64 new tokens) has no multiple-of-8 divisor: it is
        # padded with NaN to 72 (blocks of 24); lengths past it must never read the padding.
        check_decode(self.backend, q_len=5, heads=2, kv_heads=1, head_dim=128, max_len=69,
                     lengths=[80, 69, 3], blocks=DecodeBlockSizes(block_kv=32, block_rows=16))

    def test_gqa_ragged_row_tiles(self):
        # 10 tokens x 2 group heads = 20 rows -> 2 tiles of 16 (rows are padded to the tile).
        check_decode(self.backend, q_len=10, heads=4, kv_heads=2, head_dim=128, max_len=96,
                     lengths=[96, 1, 40], blocks=DecodeBlockSizes(block_kv=32, block_rows=16))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_cache_block_is_legal_for_every_length(backend):
    """Every cache length 1..1024 and block size: the block is legal for the backend (a
    multiple of 8 rows on TPU, a power of two >= 16 on GPU), divides the padded cache, and the
    padding is less than one block (at most the rounding to 8 / 16 when the block divides)."""
    for block in (16, 32, 64, 128, 256, 512):
        for max_len in range(1, 1025):
            b, padded = cache_block(max_len, block, backend)
            if backend == "tpu":
                assert b % 8 == 0 and b <= max(block, 8), (max_len, block, b)
            else:
                assert b >= 16 and b & (b - 1) == 0 and b <= block, (max_len, block, b)
            assert padded % b == 0 and max_len <= padded < max_len + b, (max_len, block, b)
            assert b * 4 >= min(block, padded), (max_len, block, b)  # no tiny blocks


def test_decode_bad_lengths():
    q = jnp.zeros((2, 1, 4, 64))
    cache = jnp.zeros((2, 32, 2, 64))
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, cache, cache, jnp.zeros((3,), jnp.int32), backend="gpu")
