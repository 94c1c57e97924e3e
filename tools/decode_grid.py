"""The cache lengths at which the decode kernel is compiled for real hardware, and their
tiling classes.

`DECODE_GRID` is the full grid (171 lengths: every length 1..80, where small prompts plus a
few new tokens live, and a spread to 1024: odd, even, primes, powers of two and their
neighbours). `tools/aot_compile_tpu_kernel.py --decode-grid` and
`tests/kernels/gpu_aot_worker.py --decode-grid` compile all of it (minutes per target).

The test suite compiles one length per *tiling class* (`representatives`). What a cache
length changes in the compiled program is decided by `cache_block`: the cache block
`block_kv`, the padded cache length, and from them whether the cache is one block, whether
it is padded, and whether its last block is partial. Inside a class the kernels differ only
in integer constants (the real cache length in the mask, the grid's block count); the block
shapes -- what Mosaic's (8, 128) rule and Triton's power-of-two rule judge -- are the same.
The largest length of each class is taken (most blocks, so GPU split counts are exercised,
and q_len 5 fits). This module imports no accelerator plugin, so both toolchains' workers
may use it.
"""

from __future__ import annotations

from llm.kernels.block_sizes import DecodeBlockSizes
from llm.kernels.decode_attention import cache_block

DECODE_GRID = tuple(sorted(set(range(1, 81)) | set(range(81, 1025, 13)) | {
    96, 100, 127, 128, 129, 200, 255, 256, 257, 333, 500, 511, 512, 513, 640, 997, 1000, 1023,
    1024}))


def tiling_class(length: int, backend: str,
                 block: int = DecodeBlockSizes.block_kv) -> tuple[int, bool, bool, bool]:
    """(block_kv, one block?, padded?, last block partial?) of a cache of `length` positions
    on `backend` ("tpu" or "gpu") with the default (or given) cache block."""
    block_kv, padded = cache_block(length, block, backend)
    return block_kv, padded == block_kv, padded != length, length % block_kv != 0


def representatives(backend: str, lengths: tuple[int, ...] = DECODE_GRID) -> tuple[int, ...]:
    """One length per tiling class of `lengths` (the largest of each), sorted."""
    best: dict[tuple, int] = {}
    for length in lengths:
        key = tiling_class(length, backend)
        best[key] = max(best.get(key, 0), length)
    return tuple(sorted(best.values()))
