"""flash_attention vs mha_reference: forward and dq/dk/dv, on both kernel backends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.kernels import BlockSizes, flash_attention, mha_reference
from tests.kernels.helpers import (
    BF16_TOL,
    FP32_TOL,
    assert_close,
    kernel_mode,
    packed_segments,
    random_qkv,
)


def check_against_reference(backend, *, q_len, kv_len, heads, kv_heads, head_dim, causal,
                            segments, dtype=jnp.float32, blocks=None, sm_scale=None, seed=0,
                            batch=1, jit=False):
    q, k, v, do = random_qkv(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    seg = {}
    if segments:
        seg = dict(q_segment_ids=packed_segments(batch, q_len, segments[0]),
                   kv_segment_ids=packed_segments(batch, kv_len, segments[1]))

    def kernel(q, k, v):
        return flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, block_sizes=blocks,
                               backend=backend, **seg)

    def reference(q, k, v):
        return mha_reference(q, k, v, causal=causal, sm_scale=sm_scale, **seg)

    if jit:
        kernel = jax.jit(kernel)
    up = [x.astype(jnp.float32) for x in (q, k, v, do)]
    with kernel_mode(backend):
        out, vjp = jax.vjp(kernel, q, k, v)
        grads = vjp(do)
        ref_out, ref_vjp = jax.vjp(reference, *up[:3])
        ref_grads = ref_vjp(up[3])
    tol = FP32_TOL if dtype == jnp.float32 else BF16_TOL
    assert out.dtype == dtype and out.shape == q.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert got.dtype == dtype, f"{name} dtype {got.dtype}"
        assert_close(name, got, want, tol)


class TestFlashAttentionGPU:
    """Pallas Triton kernels; interpreted unless a GPU is present. Small blocks (16-64) keep
    the interpreter fast and give many blocks per sequence, so block skipping, the masked /
    unmasked split and the padding of ragged lengths all get exercised."""

    backend = "gpu"
    small = BlockSizes(block_q=32, block_kv=32, block_q_dkv=16, block_kv_dkv=32, block_q_dq=32,
                       block_kv_dq=16)

    def test_causal_mha_ragged_length(self):
        check_against_reference(self.backend, q_len=100, kv_len=100, heads=2, kv_heads=2,
                                head_dim=64, causal=True, segments=None, blocks=self.small,
                                batch=2, jit=True)

    def test_noncausal_gqa_segments_cross_lengths(self):
        check_against_reference(self.backend, q_len=64, kv_len=150, heads=4, kv_heads=2,
                                head_dim=64, causal=False, segments=([20, 45], [70, 120]),
                                blocks=self.small)

    def test_causal_mqa_segments_uneven_blocks(self):
        blocks = BlockSizes(block_q=16, block_kv=64, block_q_dkv=32, block_kv_dkv=16,
                            block_q_dq=64, block_kv_dq=32)
        check_against_reference(self.backend, q_len=90, kv_len=90, heads=4, kv_heads=1,
                                head_dim=64, causal=True, segments=([30, 31, 77], [30, 31, 77]),
                                blocks=blocks, sm_scale=0.3)

    def test_bf16_head_dim_128_gqa_default_blocks(self):
        check_against_reference(self.backend, q_len=160, kv_len=160, heads=4, kv_heads=2,
                                head_dim=128, causal=True, segments=([50], [50]),
                                dtype=jnp.bfloat16)

    def test_rows_with_no_visible_key_are_zero(self):
        # Segment 3 exists only on the query side: those rows attend nothing -> 0 output and
        # no gradient, like the reference.
        check_against_reference(self.backend, q_len=48, kv_len=40, heads=2, kv_heads=1,
                                head_dim=64, causal=False, segments=([16, 32], [16]),
                                blocks=self.small)


class TestFlashAttentionTPU:
    """Pallas Mosaic kernels; interpreted (force_tpu_interpret_mode, ~100x slower) unless a
    TPU is present. Blocks are 128 (the Mosaic minimum), shapes tiny."""

    backend = "tpu"
    blocks = BlockSizes(*(128,) * 6)

    def test_causal_gqa_ragged_length(self):
        check_against_reference(self.backend, q_len=200, kv_len=200, heads=2, kv_heads=1,
                                head_dim=64, causal=True, segments=None, blocks=self.blocks)

    def test_noncausal_segments_cross_lengths_padding(self):
        check_against_reference(self.backend, q_len=130, kv_len=300, heads=2, kv_heads=2,
                                head_dim=64, causal=False, segments=([60], [100, 200]),
                                blocks=self.blocks)

    def test_bf16_causal_segments_head_dim_128(self):
        check_against_reference(self.backend, q_len=256, kv_len=256, heads=2, kv_heads=1,
                                head_dim=128, causal=True, segments=([100], [100]),
                                dtype=jnp.bfloat16, blocks=self.blocks)


def prefix_lm_rows(length: int, boundaries: list[int], prefix_lens: list[int]):
    """(segment ids [1, length], prefix [1, length]) as the prefix_lm objective lays out a
    packed row: documents split at `boundaries`, the first prefix_lens[d] tokens of document d
    are its bidirectional prefix."""
    seg = np.asarray(packed_segments(1, length, boundaries))[0]
    starts = [0, *boundaries]
    pos = np.arange(length) - np.asarray(starts)[seg - 1]
    prefix = (pos < np.asarray(prefix_lens)[seg - 1]).astype(np.int32)
    return jnp.asarray(seg[None]), jnp.asarray(prefix[None])


def prefix_lm_mask_by_hand(seg, prefix) -> jax.Array:
    """[1, 1, len, len]: written out from the definition, loop by loop (independent of
    llm.kernels.reference): i sees j when they share a segment and j <= i or both are in the
    prefix."""
    seg, prefix = np.asarray(seg)[0], np.asarray(prefix)[0]
    n = len(seg)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            mask[i, j] = seg[i] == seg[j] and (j <= i or (prefix[i] and prefix[j]))
    return jnp.asarray(mask[None, None])


def check_prefix_lm(backend, *, length, heads, kv_heads, boundaries, prefix_lens, blocks,
                    packed=True, dtype=jnp.float32, batch=2):
    """flash_attention(prefix=...) vs the reference with a hand-built mask (the `xla` path's
    numbers): forward and dq, dk, dv. Batch row 1 has a different prefix than row 0."""
    q, k, v, do = random_qkv(7, batch, length, length, heads, kv_heads, 64, dtype)
    seg0, pfx0 = prefix_lm_rows(length, boundaries, prefix_lens)
    seg1, pfx1 = prefix_lm_rows(length, boundaries, [p // 2 for p in prefix_lens])
    seg = jnp.concatenate([seg0, seg1][:batch])
    pfx = jnp.concatenate([pfx0, pfx1][:batch])
    mask = jnp.concatenate([prefix_lm_mask_by_hand(seg0, pfx0),
                            prefix_lm_mask_by_hand(seg1, pfx1)][:batch])
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg) if packed else {}

    def kernel(q, k, v):
        return flash_attention(q, k, v, causal=True, prefix=pfx, block_sizes=blocks,
                               backend=backend, **ids)

    def reference(q, k, v):  # the mask carries the segments too
        return mha_reference(q, k, v, causal=False, mask=mask)

    up = [x.astype(jnp.float32) for x in (q, k, v, do)]
    with kernel_mode(backend):
        out, vjp = jax.vjp(jax.jit(kernel), q, k, v)
        grads = vjp(do)
        ref_out, ref_vjp = jax.vjp(reference, *up[:3])
        ref_grads = ref_vjp(up[3])
    tol = FP32_TOL if dtype == jnp.float32 else BF16_TOL
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert_close(f"prefix-LM {name}", got, want, tol)


class TestPrefixLM:
    """Prefix-LM mask (bidirectional prefix, causal suffix), packed documents, both lowerings
    interpreted. Prefixes span several blocks, so blocks above the causal diagonal must be
    visited (prefix keys) while others stay skipped."""

    def test_gpu_packed_gqa(self):
        check_prefix_lm("gpu", length=100, heads=4, kv_heads=2, boundaries=[45, 46, 80],
                        prefix_lens=[40, 1, 20, 7], blocks=TestFlashAttentionGPU.small)

    def test_gpu_single_document_long_prefix_bf16(self):
        blocks = BlockSizes(block_q=16, block_kv=32, block_q_dkv=32, block_kv_dkv=16,
                            block_q_dq=32, block_kv_dq=16)
        check_prefix_lm("gpu", length=90, heads=2, kv_heads=1, boundaries=[],
                        prefix_lens=[70], blocks=blocks, packed=False, dtype=jnp.bfloat16)

    def test_tpu_packed(self):
        check_prefix_lm("tpu", length=300, heads=2, kv_heads=1, boundaries=[100, 230],
                        prefix_lens=[20, 90, 50], blocks=BlockSizes(*(128,) * 6), batch=1)

    def test_tpu_single_document(self):
        check_prefix_lm("tpu", length=256, heads=2, kv_heads=2, boundaries=[],
                        prefix_lens=[150], blocks=BlockSizes(*(128,) * 6), packed=False,
                        batch=1)


def test_prefix_lm_matches_the_models_xla_path():
    """`attend(impl="pallas")` and `attend(impl="xla")` with the objective's `prefix`."""
    from llm.model.attention import attend

    q, k, v, _ = random_qkv(11, 1, 64, 64, 4, 2, 64)
    seg, pfx = prefix_lm_rows(64, [30], [10, 25])
    with jax.default_matmul_precision("highest"):
        got = attend(q, k, v, segment_ids=seg, causal=True, impl="pallas", prefix=pfx)
        want = attend(q, k, v, segment_ids=seg, causal=True, impl="xla", prefix=pfx)
    assert_close("attend pallas vs xla", got, want, FP32_TOL)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_fully_masked_blocks_are_skipped(backend):
    """Keys in fully masked blocks are set to NaN. Attention multiplies V by a probability of
    exactly 0 for masked keys, and 0 * NaN = NaN, so any visit to those blocks (forward, dQ or
    dK/dV kernel) would put NaN in the result; finite outputs equal to the reference on clean
    inputs show the blocks were never computed.

    Causal: q_len = 1 block, kv_len = 3 blocks: kv blocks 1 and 2 are above the diagonal.
    Segments: kv block 2 belongs to a document no query has.
    """
    block = 32 if backend == "gpu" else 128
    blocks = BlockSizes(*(block,) * 6)
    q, k, v, do = random_qkv(3, 1, block, 3 * block, 2, 1, 64)
    poisoned = jnp.arange(3 * block)[None, :, None, None] >= block
    seg_q = packed_segments(1, block, [block // 2])
    seg_kv = packed_segments(1, 3 * block, [block // 2, block])  # ids 1, 2, then 3 = orphan
    for causal, seg, bad in ((True, {}, poisoned),
                             (False, dict(q_segment_ids=seg_q, kv_segment_ids=seg_kv),
                              jnp.arange(3 * block)[None, :, None, None] >= 2 * block)):
        k_bad, v_bad = jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v)
        with kernel_mode(backend):
            out, vjp = jax.vjp(lambda q, k, v, c=causal, s=seg: flash_attention(
                q, k, v, causal=c, block_sizes=blocks, backend=backend, **s), q, k_bad, v_bad)
            dq, dk, dv = vjp(do)
            ref, ref_vjp = jax.vjp(lambda q, k, v, c=causal, s=seg: mha_reference(
                q, k, v, causal=c, **s), q, k, v)
            rdq, rdk, rdv = ref_vjp(do)
        keep = ~bad[0, :, 0, 0]
        assert_close(f"out causal={causal}", out, ref, FP32_TOL)
        assert_close("dq", dq, rdq, FP32_TOL)
        assert_close("dk (visited blocks)", dk[:, keep], rdk[:, keep], FP32_TOL)
        assert_close("dv (visited blocks)", dv[:, keep], rdv[:, keep], FP32_TOL)
        # Skipped kv blocks get exactly zero gradient (their dK/dV program loops over nothing).
        assert np.all(np.asarray(dk[:, ~keep]) == 0) and np.all(np.asarray(dv[:, ~keep]) == 0)


def test_public_defaults_run_on_this_host():
    """backend="auto", interpret=None: picks the right lowering for this machine."""
    q, k, v, _ = random_qkv(5, 1, 40, 40, 2, 1, 64)
    with jax.default_matmul_precision("highest"):
        assert_close("out", flash_attention(q, k, v), mha_reference(q, k, v), FP32_TOL)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=jnp.zeros((1, 8, 3, 64)), v=jnp.zeros((1, 8, 3, 64))), "not a multiple"),
    (dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), "both"),
    (dict(q_segment_ids=jnp.zeros((1, 7), jnp.int32),
          kv_segment_ids=jnp.zeros((1, 8), jnp.int32)), r"\[batch, len\]"),
    (dict(v=jnp.zeros((1, 8, 2, 64), jnp.bfloat16)), "dtype"),
    (dict(q=jnp.zeros((1, 8, 4, 48)), k=jnp.zeros((1, 8, 2, 48)), v=jnp.zeros((1, 8, 2, 48))),
     "power of two"),
    (dict(block_sizes=BlockSizes(block_q=24)), "block_q=24"),
    (dict(backend="cuda"), "backend"),
    (dict(sm_scale=jnp.float32(0.1)), "sm_scale"),
    (dict(prefix=jnp.ones((1, 8), jnp.int32), causal=False), "causal=True"),
    (dict(prefix=jnp.ones((1, 7), jnp.int32)), r"prefix must be \[batch, len\]"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    args = dict(q=jnp.zeros((1, 8, 4, 64)), k=jnp.zeros((1, 8, 2, 64)),
                v=jnp.zeros((1, 8, 2, 64)))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), backend=args.pop(
            "backend", "gpu"), **args)
