"""CPU time of the blocked attention (`llm.kernels.blocked`, attention_impl="xla_blocked") alone,
forward and forward + backward, at one layer's shape of the train-step benchmark, with packed
segment ids as the trainer passes them (so the per-block mask check is on):

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      taskset -c 1 .venv/bin/python tools/bench_blocked_attention.py --batch 2 --seq 2048 \\
      --blocks 128x128,256x128

Prints, per block size, the median wall ms of `--iters` calls (the variants take turns, so load
hits all alike) and XLA's temporaries of forward + backward (`memory_analysis()`, load-free).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm.kernels.blocked import blocked_attention


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--blocks", default="128x128", help="block_q x block_k, comma-separated")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    q, k, v, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    seg = jnp.ones((args.batch, args.seq), jnp.int32)
    variants = {}
    for spec in args.blocks.split(","):
        bq, bk = (int(x) for x in spec.split("x"))

        def attn(q, k, v, bq=bq, bk=bk):
            return blocked_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                     causal=True, block_q=bq, block_k=bk)

        fwd = jax.jit(attn)
        grad = jax.jit(jax.grad(lambda q, k, v, f=attn: jnp.sum(f(q, k, v) * w),
                                argnums=(0, 1, 2)))
        temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready((fwd(q, k, v), grad(q, k, v)))
        variants[spec] = (fwd, grad, temp, [], [])
    for _ in range(args.iters):
        for fwd, grad, _, t_fwd, t_grad in variants.values():
            for fn, out in ((fwd, t_fwd), (grad, t_grad)):
                t = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                out.append((time.perf_counter() - t) * 1e3)
    print(f"blocked attention, q/k/v {list(shape)} fp32, causal + segment ids, "
          f"{args.iters} calls each")
    for spec, (_, _, temp, t_fwd, t_grad) in variants.items():
        print(f"  blocks {spec:>8}: fwd {statistics.median(t_fwd):7.1f} ms   fwd+bwd "
              f"{statistics.median(t_grad):7.1f} ms (min {min(t_grad):.1f})   temp {temp:.1f} MiB")


if __name__ == "__main__":
    main()
