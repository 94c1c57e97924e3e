"""Compile the Triton kernels for an H100 without a GPU (needs jax_cuda12_plugin installed).

XLA's GPU compiler runs deviceless against the target description in
h100_target_config.txtpb; the Triton custom calls go through Triton's whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX). Usage: python -m tests.kernels.gpu_aot_worker <dump_dir>
Prints one line per compiled function and the kernels found in the emitted PTX.
"""

from __future__ import annotations

import glob
import os
import re
import sys

DUMP = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_aot_dump"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_dump_to={DUMP}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from llm.kernels import decode_attention, flash_attention  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    with open(os.path.join(HERE, "h100_target_config.txtpb")) as fh:
        target = fh.read()
    topo = topologies.get_topology_desc(platform="cuda", target_config=target,
                                        topology="1x1x1")
    device = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def train(causal, segments):
        def loss(q, k, v, qs, ks):
            out = flash_attention(q, k, v, q_segment_ids=qs if segments else None,
                                  kv_segment_ids=ks if segments else None, causal=causal,
                                  backend="gpu", interpret=False)
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))

    cases = []
    for seq, heads, kv_heads, hd, dtype, causal, seg in (
            (1000, 8, 2, 128, jnp.bfloat16, True, False),
            (1024, 4, 4, 64, jnp.bfloat16, True, True),
            (640, 4, 1, 128, jnp.float32, False, True)):
        q = spec((2, seq, heads, hd), dtype)
        kv = spec((2, seq, kv_heads, hd), dtype)
        ids = spec((2, seq), jnp.int32)
        cases.append((f"fwd+bwd seq={seq} h={heads}/{kv_heads} d={hd} {jnp.dtype(dtype).name} "
                      f"causal={causal} segments={seg}", train(causal, seg), (q, kv, kv, ids, ids)))
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


if __name__ == "__main__":
    main()
