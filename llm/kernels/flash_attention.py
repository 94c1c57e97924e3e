"""Flash attention for training: argument checks, padding, backend dispatch, custom_vjp.

The forward saves the per-row logsumexp; the backward runs a dK/dV kernel and a dQ kernel, each
recomputing the attention probabilities block by block from q, k and that logsumexp (nothing of
size [seq, seq] is stored; no atomics). Sequence lengths that are not a multiple of
the blocks are padded here and the padding is masked inside the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from llm.kernels import flash_mosaic, flash_triton
from llm.kernels.backend import resolve_backend, resolve_interpret
from llm.kernels.block_sizes import BlockSizes, fit_block, round_up

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class _Config:
    backend: str
    interpret: bool
    causal: bool
    sm_scale: float
    blocks: BlockSizes
    q_len: int
    kv_len: int
    q_len_padded: int
    kv_len_padded: int


def _check_inputs(q, k, v, q_segment_ids, kv_segment_ids, prefix, causal: bool,
                  backend: str) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, len, heads, head_dim]; got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
    batch, _, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q{q.shape} and k{k.shape} disagree on batch or head_dim")
    if heads % k.shape[2]:
        raise ValueError(f"q has {heads} heads, not a multiple of k's {k.shape[2]} kv heads "
                         "(GQA/MQA need heads % kv_heads == 0)")
    if k.shape[1] == 0 or q.shape[1] == 0:
        raise ValueError(f"empty sequence: q{q.shape} k{k.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype among float32/bfloat16/float16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if backend == "gpu" and (head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256):
        raise ValueError(f"head_dim={head_dim} is not supported by the GPU (Triton) kernel: "
                         "use a power of two in [16, 256] (64 and 128 are tested), or "
                         "attention_impl='xla'")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        if q_segment_ids.shape != q.shape[:2] or kv_segment_ids.shape != k.shape[:2]:
            raise ValueError(
                f"segment ids must be [batch, len]: q_segment_ids{q_segment_ids.shape} should be "
                f"{q.shape[:2]}, kv_segment_ids{kv_segment_ids.shape} should be {k.shape[:2]}")
        for ids in (q_segment_ids, kv_segment_ids):
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"segment ids must be integers, got {ids.dtype}")
    if prefix is not None:
        if not causal:
            raise ValueError("prefix (prefix-LM mask) needs causal=True: without the causal "
                             "mask every key is visible already")
        if q.shape[1] != k.shape[1] or prefix.shape != q.shape[:2]:
            raise ValueError(f"prefix must be [batch, len] for self-attention (q_len == kv_len); "
                             f"got prefix{prefix.shape}, q{q.shape}, k{k.shape}")


def _pad(x: jax.Array | None, length: int, mode: str = "constant",
         axis: int = 1) -> jax.Array | None:
    """Zero-pad (or edge-pad) `axis` of `x` up to `length`."""
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _padded_inputs(cfg: _Config, q, k, v, q_seg, kv_seg, pfx):
    # Segment ids are edge-padded so padding does not widen a block's id range (which would
    # defeat block skipping); prefix flags are zero-padded; padded keys are masked by
    # position, padded queries are dropped.
    return (_pad(q, cfg.q_len_padded), _pad(k, cfg.kv_len_padded), _pad(v, cfg.kv_len_padded),
            _pad(q_seg, cfg.q_len_padded, "edge"), _pad(kv_seg, cfg.kv_len_padded, "edge"),
            _pad(pfx, cfg.q_len_padded), _pad(pfx, cfg.kv_len_padded))


def _impl(cfg: _Config):
    return flash_triton if cfg.backend == "gpu" else flash_mosaic


def _forward(cfg: _Config, q, k, v, q_seg, kv_seg, pfx):
    out, lse = _impl(cfg).forward(*_padded_inputs(cfg, q, k, v, q_seg, kv_seg, pfx),
                                  sm_scale=cfg.sm_scale, causal=cfg.causal,
                                  kv_len_valid=cfg.kv_len, blocks=cfg.blocks,
                                  interpret=cfg.interpret)
    return out[:, :cfg.q_len], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_seg, kv_seg, pfx):
    return _forward(cfg, q, k, v, q_seg, kv_seg, pfx)[0]


def _flash_fwd(cfg: _Config, q, k, v, q_seg, kv_seg, pfx):
    out, lse = _forward(cfg, q, k, v, q_seg, kv_seg, pfx)
    return out, (q, k, v, q_seg, kv_seg, pfx, out, lse)


def _flash_bwd(cfg: _Config, residuals, do):
    q, k, v, q_seg, kv_seg, pfx, out, lse = residuals
    # delta_i = sum_d o_id * do_id: a memory-bound row reduction XLA fuses well.
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    dq, dk, dv = _impl(cfg).backward(
        *_padded_inputs(cfg, q, k, v, q_seg, kv_seg, pfx), lse,
        _pad(delta, cfg.q_len_padded, axis=2), _pad(do, cfg.q_len_padded),
        sm_scale=cfg.sm_scale, causal=cfg.causal, q_len_valid=cfg.q_len,
        kv_len_valid=cfg.kv_len, blocks=cfg.blocks, interpret=cfg.interpret)
    return dq[:, :cfg.q_len], dk[:, :cfg.kv_len], dv[:, :cfg.kv_len], None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None, causal: bool = True,
                    prefix: jax.Array | None = None,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    backend: str = "auto", interpret: bool | None = None) -> jax.Array:
    """Memory-efficient softmax attention, differentiable (custom VJP), same result as
    `mha_reference` with the same arguments.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with
        heads % kv_heads == 0 (GQA/MQA). One dtype: float32, bfloat16 or float16; matmuls
        accumulate in float32.
      q_segment_ids / kv_segment_ids: [batch, q_len] / [batch, kv_len] int; a query attends a
        key only when their ids are equal (0 is conventionally padding). Both or neither.
      causal: query i attends keys j <= i (positions counted from 0 on both sides).
      prefix: [batch, len] int/bool, self-attention with causal=True only: prefix-LM masking,
        the positions marked nonzero also see each other bidirectionally (query i sees key j
        when j <= i or both are prefix positions; with segment ids, within a segment).
      sm_scale: score multiplier, default head_dim ** -0.5. Must be a Python number.
      block_sizes: `BlockSizes`; default `BlockSizes.for_backend(backend, head_dim)`.
      backend: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic) or "auto" (TPU when running on
        one, else the GPU kernel, which runs in interpret mode on CPU).
      interpret: run the kernel in the Pallas interpreter; None = when the backend's hardware
        is absent.
    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Rows that may attend nothing are 0.
    """
    backend = resolve_backend(backend)
    _check_inputs(q, k, v, q_segment_ids, kv_segment_ids, prefix, causal, backend)
    head_dim = q.shape[-1]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    if isinstance(sm_scale, jax.Array) or not isinstance(sm_scale, int | float):
        raise TypeError(f"sm_scale must be a Python float (it is baked into the kernel), got "
                        f"{type(sm_scale).__name__}")
    blocks = block_sizes or BlockSizes.for_backend(backend, head_dim)
    blocks.validate(backend)
    q_len, kv_len = q.shape[1], k.shape[1]
    fq = functools.partial(fit_block, length=q_len, backend=backend)
    fk = functools.partial(fit_block, length=kv_len, backend=backend)
    blocks = dataclasses.replace(
        blocks, block_q=fq(blocks.block_q), block_kv=fk(blocks.block_kv),
        block_q_dkv=fq(blocks.block_q_dkv), block_kv_dkv=fk(blocks.block_kv_dkv),
        block_q_dq=fq(blocks.block_q_dq), block_kv_dq=fk(blocks.block_kv_dq))
    q_mult = math.lcm(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    kv_mult = math.lcm(blocks.block_kv, blocks.block_kv_dkv, blocks.block_kv_dq)
    cfg = _Config(backend=backend, interpret=resolve_interpret(backend, interpret),
                  causal=bool(causal), sm_scale=float(sm_scale), blocks=blocks, q_len=q_len,
                  kv_len=kv_len, q_len_padded=round_up(q_len, q_mult),
                  kv_len_padded=round_up(kv_len, kv_mult))
    if q_segment_ids is not None:
        q_segment_ids = q_segment_ids.astype(jnp.int32)
        kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    if prefix is not None:
        prefix = (prefix != 0).astype(jnp.int32)
    return _flash(cfg, q, k, v, q_segment_ids, kv_segment_ids, prefix)
