"""Tile sizes for the attention kernels, with defaults per backend.

Every block size is a number of sequence positions. The kernels pad the sequence up to a
multiple of the block internally, so sequence lengths need not be multiples of any block;
a block larger than the (padded) sequence is shrunk to fit.
"""

from __future__ import annotations

import dataclasses

# Triton's tensor-core dot needs every matmul dimension >= 16 and power-of-two tiles.
_GPU_MIN_BLOCK = 16
# Mosaic tiles are (8 sublanes x 128 lanes); kv blocks sit on the lane axis of the score tile
# and q blocks on the lane axis of the transposed tile in the backward pass, so both are
# multiples of 128 on TPU.
_TPU_BLOCK_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the flash-attention kernels (forward, dK/dV, dQ).

    block_q / block_kv: forward pass tiles along q_len / kv_len.
    block_q_dkv / block_kv_dkv: the dK/dV kernel (one program per kv block, loops over q).
    block_q_dq / block_kv_dq: the dQ kernel (one program per q block, loops over kv).
    num_warps / num_stages: Triton launch parameters (GPU only; None picks from head_dim).
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_dkv: int = 64
    block_kv_dkv: int = 128
    block_q_dq: int = 128
    block_kv_dq: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    @classmethod
    def for_backend(cls, backend: str, head_dim: int = 128) -> BlockSizes:
        """Defaults tuned per backend: "gpu" (Triton) or "tpu" (Mosaic)."""
        if backend == "gpu":
            if head_dim <= 64:
                return cls(128, 64, 64, 128, 128, 64, num_warps=4, num_stages=3)
            return cls(128, 64, 64, 128, 128, 64, num_warps=8, num_stages=2)
        if backend == "tpu":
            return cls(512, 512, 512, 512, 512, 512)
        raise ValueError(f"unknown backend {backend!r}; expected 'gpu' or 'tpu'")

    def validate(self, backend: str) -> None:
        """Raise ValueError naming the bad field if a block cannot be used on `backend`."""
        for field in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq",
                      "block_kv_dq"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{field}={value!r} must be a positive int")
            if backend == "gpu" and (value < _GPU_MIN_BLOCK or value & (value - 1)):
                raise ValueError(
                    f"BlockSizes.{field}={value} is invalid for the GPU (Triton) kernel: use a "
                    f"power of two >= {_GPU_MIN_BLOCK}")
            if backend == "tpu" and value % _TPU_BLOCK_MULTIPLE:
                raise ValueError(
                    f"BlockSizes.{field}={value} is invalid for the TPU (Mosaic) kernel: use a "
                    f"multiple of {_TPU_BLOCK_MULTIPLE}")


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tile sizes of the decode-attention kernel.

    block_kv: KV-cache positions per inner-loop step.
    num_splits: the cache is cut into this many chunks processed by separate programs
      (flash-decoding), whose partial softmaxes are merged afterwards. More splits give more
      parallelism when batch * kv_heads is small. GPU only, and only when all rows fit in one
      row tile (decoding, not prefill).
    block_rows: rows per tile, a row being one (new token, q head of the group) pair; a long
      q_len (prefill through the cache) is processed in several row tiles.
    num_warps / num_stages: Triton launch parameters.
    """

    block_kv: int = 128
    num_splits: int = 8
    block_rows: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def validate(self) -> None:
        if self.block_rows < _GPU_MIN_BLOCK or self.block_rows & (self.block_rows - 1):
            raise ValueError(f"DecodeBlockSizes.block_rows={self.block_rows} must be a power of "
                             f"two >= {_GPU_MIN_BLOCK}")
        if self.block_kv < _GPU_MIN_BLOCK or self.block_kv & (self.block_kv - 1):
            raise ValueError(f"DecodeBlockSizes.block_kv={self.block_kv} must be a power of two "
                             f">= {_GPU_MIN_BLOCK}")
        if self.num_splits < 1:
            raise ValueError(f"DecodeBlockSizes.num_splits={self.num_splits} must be >= 1")


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def fit_block(block: int, length: int, backend: str) -> int:
    """Shrink `block` so it does not exceed `length` rounded up to the backend's granule."""
    if backend == "gpu":
        return min(block, max(_GPU_MIN_BLOCK, next_power_of_2(length)))
    return min(block, round_up(length, _TPU_BLOCK_MULTIPLE))
