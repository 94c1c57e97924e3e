"""Compile the TPU (Mosaic) flash-attention kernels ahead of time for a TPU topology, on a
machine without a TPU. Needs `libtpu` importable (e.g. `pip install 'jax[tpu]==<jax version>'`
in a separate venv); the compile runs in libtpu's Mosaic + XLA:TPU compilers, so layout and
VMEM errors in the kernels show up here exactly as they would on the chip.

  python tools/aot_compile_tpu_kernel.py --topology v5e:2x2 --seq 2048 --heads 8 --kv-heads 2

Prints one line per compiled function (forward, forward+backward) with the HLO custom-call
count and the compiled memory analysis; exits non-zero on the first failure.

  python tools/aot_compile_tpu_kernel.py --topology v5e:2x2,v6e:2x2 --decode-grid [--classes]

compiles the decode kernel instead, once per KV-cache length of `tools.decode_grid.DECODE_GRID`
(1..1024, odd lengths included; q_len 1 and a 5-token prefill through the cache), or with
`--classes` once per tiling class of those lengths (`tools.decode_grid.representatives`; what
the test suite runs), for each listed topology, and prints one line per failure and a summary
line "decode grid <topology> (...): <ok>/<tried> compiled" per topology.
"""

from __future__ import annotations

import argparse
import os
import sys

# Compile-only TPU devices: no TPU is needed, and libtpu must not probe for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
# Compile-only: several compiles (pytest workers, topologies) may share the machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm.kernels import BlockSizes, decode_attention, flash_attention  # noqa: E402
from tools.decode_grid import DECODE_GRID, representatives  # noqa: E402


def compile_for_topology(topology: str, *, batch: int, seq: int, heads: int, kv_heads: int,
                         head_dim: int, dtype, causal: bool, segments: bool,
                         prefix: bool = False,
                         block_sizes: BlockSizes | None = None) -> list[str]:
    """AOT-compile forward and forward+backward for `topology`; returns one report line each."""
    topo = topologies.get_topology_desc(topology, platform="tpu")
    device = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    q = spec((batch, seq, heads, head_dim), dtype)
    kv = spec((batch, seq, kv_heads, head_dim), dtype)
    seg = spec((batch, seq), jnp.int32) if segments else None
    # prefix-LM: the first half of each sequence is the bidirectional prefix
    pfx = (jnp.arange(seq)[None, :] < seq // 2).repeat(batch, 0) if prefix else None

    def attn(q, k, v, qs, ks):
        return flash_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, causal=causal,
                               prefix=pfx, block_sizes=block_sizes, backend="tpu",
                               interpret=False)

    def loss(q, k, v, qs, ks):
        return attn(q, k, v, qs, ks).astype(jnp.float32).sum()

    lens = spec((batch,), jnp.int32)
    q_dec = spec((batch, 1, heads, head_dim), dtype)
    q_pre = spec((batch, min(seq, 512), heads, head_dim), dtype)

    def decode(q, k, v, lengths):
        return decode_attention(q, k, v, lengths, backend="tpu", interpret=False)

    lines = []
    # Pallas asks the default device which TPU generation it lowers for.
    with jax.default_device(device):
        lines += _compile_all(topology, attn, loss, decode, q, kv, seg, q_dec, q_pre, lens)
    return lines


def _compile_all(topology, attn, loss, decode, q, kv, seg, q_dec, q_pre, lens) -> list[str]:
    lines = []
    for name, fn, args in (("forward", attn, (q, kv, kv, seg, seg)),
                           ("forward+backward", jax.grad(loss, argnums=(0, 1, 2)),
                            (q, kv, kv, seg, seg)),
                           ("decode", decode, (q_dec, kv, kv, lens)),
                           ("prefill through the cache", decode, (q_pre, kv, kv, lens))):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
        n_kernels = lowered.as_text().count("tpu_custom_call")
        compiled = lowered.compile()
        code = getattr(compiled.memory_analysis(), "generated_code_size_in_bytes", None)
        lines.append(f"{topology} {name}: compiled OK, {n_kernels} Mosaic kernel(s), "
                     f"{code} bytes of TPU code")
    return lines


def compile_decode_grid(topology: str, lengths=DECODE_GRID, *, batch: int = 2, heads: int = 8,
                        kv_heads: int = 2, head_dim: int = 128, dtype=jnp.bfloat16,
                        q_lens=(1, 5)) -> tuple[int, int, list[str]]:
    """AOT-compile decode_attention for `topology` at every cache length (and each q_len <=
    the length). Returns (compiled, tried, failure lines)."""
    topo = topologies.get_topology_desc(topology, platform="tpu")
    device = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def decode(q, k, v, lengths):
        return decode_attention(q, k, v, lengths, backend="tpu", interpret=False)

    ok, tried, failures = 0, 0, []
    with jax.default_device(device):
        for length in lengths:
            cache = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype,
                                         sharding=sharding)
            lens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
            for q_len in (t for t in q_lens if t <= length):
                q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype,
                                         sharding=sharding)
                tried += 1
                try:
                    jax.jit(decode).trace(q, cache, cache, lens).lower(
                        lowering_platforms=("tpu",)).compile()
                    ok += 1
                except Exception as e:  # noqa: BLE001 -- report every failing length
                    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else repr(e)
                    failures.append(f"{topology} cache={length} q_len={q_len}: FAILED {msg}")
    return ok, tried, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e:2x2",
                   help="e.g. v5e:2x2, v6e:2x2, v4:2x2x1; with --decode-grid a comma-separated "
                        "list is compiled in this one process")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--segments", action="store_true")
    p.add_argument("--prefix", action="store_true", help="prefix-LM mask (half the sequence)")
    p.add_argument("--decode-grid", action="store_true",
                   help="compile the decode kernel over DECODE_GRID cache lengths instead")
    p.add_argument("--classes", action="store_true",
                   help="with --decode-grid: one cache length per tiling class of the grid")
    args = p.parse_args(argv)
    if args.decode_grid:
        grid = representatives("tpu") if args.classes else DECODE_GRID
        what = "tiling-class representatives" if args.classes else "cache lengths"
        failed = False
        for topology in args.topology.split(","):
            ok, tried, failures = compile_decode_grid(
                topology, grid, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim, dtype=jnp.dtype(args.dtype))
            for line in failures:
                print(line)
            print(f"decode grid {topology} ({len(grid)} {what} {grid[0]}..{grid[-1]}, q_len 1 "
                  f"and 5, {jnp.dtype(args.dtype).name}): {ok}/{tried} compiled", flush=True)
            failed |= ok != tried
        return 1 if failed else 0
    for line in compile_for_topology(
            args.topology, batch=args.batch, seq=args.seq, heads=args.heads,
            kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=jnp.dtype(args.dtype),
            causal=not args.no_causal, segments=args.segments, prefix=args.prefix):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
