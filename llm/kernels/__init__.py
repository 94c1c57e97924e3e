"""Pallas attention kernels and their jnp references.

  flash_attention(q, k, v, ...)            training attention, forward + backward (custom VJP)
  decode_attention(q, k_cache, v_cache, lengths, ...)   few query tokens vs a ragged KV cache
  mha_reference / decode_attention_reference            plain-jnp ground truth

Each kernel has a GPU lowering (Pallas Triton) and a TPU lowering (Pallas Mosaic); see
docs/kernels.md.
"""

from llm.kernels.block_sizes import BlockSizes, DecodeBlockSizes
from llm.kernels.decode_attention import decode_attention
from llm.kernels.flash_attention import flash_attention
from llm.kernels.reference import decode_attention_reference, mha_reference

__all__ = [
    "BlockSizes",
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_reference",
    "flash_attention",
    "mha_reference",
]
