"""Run in a subprocess with 4 fake CPU devices: sharded_flash_attention (the Pallas kernel, then
the C++ CPU kernel) vs mha_reference."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llm.kernels import BlockSizes, mha_reference  # noqa: E402
from llm.kernels.sharding import sharded_flash_attention  # noqa: E402


def main() -> None:
    auto = (jax.sharding.AxisType.Auto,) * 2  # as llm.parallel.mesh builds it
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=auto)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (4, 40, 4, 64))
    k = jax.random.normal(ks[1], (4, 40, 2, 64))
    v = jax.random.normal(ks[2], (4, 40, 2, 64))
    do = jax.random.normal(ks[3], (4, 40, 4, 64))
    seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], 4, axis=0), jnp.int32)
    blocks = BlockSizes(*(16,) * 6)

    def ours(q, k, v):
        return sharded_flash_attention(q, k, v, mesh=mesh, batch_axes="data", head_axes="tensor",
                                       q_segment_ids=seg, kv_segment_ids=seg,
                                       block_sizes=blocks, backend="gpu")

    out, vjp = jax.vjp(jax.jit(ours), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: mha_reference(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg), q, k, v)
    errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *vjp(do)),
                                                            (ref, *ref_vjp(do)))]
    print("max errors", errs)
    assert max(errs) < 2e-5, errs
    assert len(out.sharding.device_set) == 4

    from llm.kernels.cpu_attention import available, cpu_flash_attention

    if available()[0]:
        def cpu(q, k, v):
            return sharded_flash_attention(q, k, v, mesh=mesh, batch_axes="data",
                                           head_axes="tensor", q_segment_ids=seg,
                                           kv_segment_ids=seg, kernel=cpu_flash_attention)

        fn = jax.jit(cpu)
        hlo = fn.lower(q, k, v).compile().as_text()
        assert "all-gather" not in hlo  # each device runs its own shard
        out, vjp = jax.vjp(fn, q, k, v)
        errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *vjp(do)),
                                                                (ref, *ref_vjp(do)))]
        print("cpu kernel max errors", errs)
        assert max(errs) < 2e-5, errs
        assert len(out.sharding.device_set) == 4
    print("OK")


if __name__ == "__main__":
    main()
