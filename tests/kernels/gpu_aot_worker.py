"""Compile the Triton kernels for an H100 without a GPU (needs jax_cuda12_plugin installed).

XLA's GPU compiler runs deviceless against the target description in
h100_target_config.txtpb; the Triton custom calls go through Triton's whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX). Usage: python -m tests.kernels.gpu_aot_worker <dump_dir>
Prints one line per compiled function and the kernels found in the emitted PTX; with
--classes, then also compiles the decode grid's tiling classes (below) in the same process.

python -m tests.kernels.gpu_aot_worker <dump_dir> --decode-grid [--classes] [--shard i/n]
compiles the decode kernel instead, at every KV-cache length of `tools.decode_grid.DECODE_GRID`
(the TPU tool's grid, 1..1024 with odd lengths), or with --classes at one length per GPU
tiling class of it (what the test suite runs); with --shard, every n-th of them from the i-th;
q_len 1 and 5. Prints failures and "decode grid h100 (...): <ok>/<tried> compiled".
"""

from __future__ import annotations

import glob
import os
import re
import sys

DUMP = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_aot_dump"
os.environ["JAX_PLATFORMS"] = "cpu"
if "--decode-grid" not in sys.argv:  # the PTX is read back from XLA's dump
    os.environ["XLA_FLAGS"] = f"--xla_dump_to={DUMP}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from llm.kernels import decode_attention, flash_attention  # noqa: E402
from tools.decode_grid import DECODE_GRID, representatives  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def decode_grid(spec, grid: tuple[int, ...], shard: int = 0, shards: int = 1) -> int:
    """Compile decode_attention for every cache length of `grid` (those of `shard` out of
    `shards` interleaved parts); returns the exit code."""
    def decode(q, k, v, n):
        return decode_attention(q, k, v, n, backend="gpu", interpret=False)

    ok = tried = 0
    for length in grid[shard::shards]:
        cache = spec((2, length, 2, 128), jnp.bfloat16)
        for q_len in (t for t in (1, 5) if t <= length):
            tried += 1
            try:
                jax.jit(decode).trace(spec((2, q_len, 8, 128), jnp.bfloat16), cache, cache,
                                      spec((2,), jnp.int32)).lower(
                    lowering_platforms=("cuda",)).compile()
                ok += 1
                print(f"h100 cache={length} q_len={q_len}: compiled", flush=True)
            except Exception as e:  # noqa: BLE001 -- report every failing length
                print(f"h100 cache={length} q_len={q_len}: FAILED {str(e)[:200]!r}", flush=True)
    part = f", part {shard + 1} of {shards}" if shards > 1 else ""
    what = "tiling-class representatives" if grid != DECODE_GRID else "cache lengths"
    print(f"decode grid h100 ({len(grid)} {what} {grid[0]}..{grid[-1]}{part}, q_len 1 and 5, "
          f"bfloat16): {ok}/{tried} compiled")
    return 0 if ok == tried else 1


def main() -> None:
    with open(os.path.join(HERE, "h100_target_config.txtpb")) as fh:
        target = fh.read()
    topo = topologies.get_topology_desc(platform="cuda", target_config=target,
                                        topology="1x1x1")
    device = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    if "--decode-grid" in sys.argv:  # optional "--shard i/n": every n-th length from the i-th
        shard, shards = 0, 1
        if "--shard" in sys.argv:
            shard, shards = map(int, sys.argv[sys.argv.index("--shard") + 1].split("/"))
        grid = representatives("gpu") if "--classes" in sys.argv else DECODE_GRID
        with jax.default_device(device):
            sys.exit(decode_grid(spec, grid, shard, shards))

    def train(causal, segments, prefix):
        def loss(q, k, v, qs, ks):
            pfx = (jnp.arange(q.shape[1]) < q.shape[1] // 3)[None].repeat(q.shape[0], 0)
            out = flash_attention(q, k, v, q_segment_ids=qs if segments else None,
                                  kv_segment_ids=ks if segments else None, causal=causal,
                                  prefix=pfx if prefix else None, backend="gpu",
                                  interpret=False)
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))

    cases = []
    for seq, heads, kv_heads, hd, dtype, causal, seg, pfx in (
            (1000, 8, 2, 128, jnp.bfloat16, True, False, False),
            (1024, 4, 4, 64, jnp.bfloat16, True, True, False),
            (640, 4, 1, 128, jnp.float32, False, True, False),
            (777, 8, 2, 128, jnp.bfloat16, True, True, True)):
        q = spec((2, seq, heads, hd), dtype)
        kv = spec((2, seq, kv_heads, hd), dtype)
        ids = spec((2, seq), jnp.int32)
        cases.append((f"fwd+bwd seq={seq} h={heads}/{kv_heads} d={hd} {jnp.dtype(dtype).name} "
                      f"causal={causal} segments={seg} prefix={pfx}", train(causal, seg, pfx),
                      (q, kv, kv, ids, ids)))
    cases.append(("decode b=8 q_len=1 h=32/8 d=128 cache=4096 bf16",
                  lambda q, k, v, n: decode_attention(q, k, v, n, backend="gpu", interpret=False),
                  (spec((8, 1, 32, 128), jnp.bfloat16), spec((8, 4096, 8, 128), jnp.bfloat16),
                   spec((8, 4096, 8, 128), jnp.bfloat16), spec((8,), jnp.int32))))
    cases.append(("prefill b=2 q_len=512 h=32/8 d=128 cache=4096 bf16",
                  lambda q, k, v, n: decode_attention(q, k, v, n, backend="gpu", interpret=False),
                  (spec((2, 512, 32, 128), jnp.bfloat16), spec((2, 4096, 8, 128), jnp.bfloat16),
                   spec((2, 4096, 8, 128), jnp.bfloat16), spec((2,), jnp.int32))))
    with jax.default_device(device):
        for name, fn, args in cases:
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compile()
            print(f"compiled OK for {device.device_kind}: {name}")
    kernels = set()
    for path in glob.glob(os.path.join(DUMP, "*.ptx")):
        with open(path) as fh:
            text = fh.read()
        for name in re.findall(r"\.entry (\w+)", text):
            if "attention" in name:
                kernels.add((name, "wgmma" in text))
    for name, wgmma in sorted(kernels):
        print(f"ptx kernel {name} wgmma={wgmma}")
    if "--classes" in sys.argv:  # then the decode kernel's tiling classes, in this process
        with jax.default_device(device):
            sys.exit(decode_grid(spec, representatives("gpu")))


if __name__ == "__main__":
    main()
