"""Benchmark attention implementations side by side: ours (Pallas), xla, cudnn, jax_pallas.

On a GPU or TPU (one command, prints a table; --json writes every row):

  python tools/bench_attention.py --json bench_attention.json

measures causal bf16 attention, head_dim 128, seq 1k..16k (batch chosen so every row has the
same number of tokens), forward and forward+backward, reporting
  TFLOP/s  = model FLOPs / median wall time, in the project's one convention
             (`llm.model.config.attention_flops`, as the model's MFU): causal counted half
             (2*b*h*s^2*d forward), forward+backward = 3x forward (no recomputation counted;
             the FlashAttention papers count 3.5x, so their fwd+bwd TFLOP/s read 7/6 higher);
  mem MiB  = memory of the compiled program (arguments + outputs + XLA temporaries, from
             `compiled.memory_analysis()`), i.e. what one call needs on the device.
Implementations:
  ours        llm.kernels.flash_attention (Triton on GPU, Mosaic on TPU)
  xla         llm.kernels.mha_reference (materialises the scores)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn")      (NVIDIA only)
  jax_pallas  jax.experimental.pallas.ops.gpu.attention.mha on GPU,
              jax.experimental.pallas.ops.tpu.flash_attention on TPU

On CPU only a correctness check at tiny sizes is possible (kernels interpreted):

  python tools/bench_attention.py --cpu-check
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm.kernels import flash_attention, mha_reference  # noqa: E402
from llm.model import config as model_config  # noqa: E402

IMPLS = ("ours", "xla", "cudnn", "jax_pallas")


@dataclasses.dataclass
class Row:
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    seq: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    ms: float | None = None
    tflops: float | None = None
    mem_mib: float | None = None
    max_err: float | None = None
    error: str | None = None


def attention_fn(impl: str, *, causal: bool, sm_scale: float, interpret: bool | None = None
                 ) -> Callable:
    """(q, k, v) -> out, all [batch, seq, heads, head_dim], for implementation `impl`."""
    platform = jax.default_backend()
    if impl == "ours":
        return functools.partial(flash_attention, causal=causal, sm_scale=sm_scale,
                                 interpret=interpret)
    if impl == "xla":
        return functools.partial(mha_reference, causal=causal, sm_scale=sm_scale)
    if impl == "cudnn":
        if platform != "gpu":
            raise RuntimeError("cuDNN attention needs an NVIDIA GPU")
        return functools.partial(jax.nn.dot_product_attention, is_causal=causal, scale=sm_scale,
                                 implementation="cudnn")
    if impl == "jax_pallas":
        if platform == "tpu":
            from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa

            def tpu_op(q, k, v):  # [b, h, s, d] layout; MHA only, so repeat kv heads
                groups = q.shape[2] // k.shape[2]
                k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
                t = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
                return t(tpu_fa.flash_attention(t(q), t(k), t(v), causal=causal,
                                                sm_scale=sm_scale))
            return tpu_op
        from jax.experimental.pallas.ops.gpu import attention as gpu_fa

        def gpu_op(q, k, v):  # MHA only: repeat kv heads
            groups = q.shape[2] // k.shape[2]
            k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
            return gpu_fa.mha(q, k, v, None, sm_scale=sm_scale, causal=causal,
                              interpret=bool(interpret) if interpret is not None
                              else platform != "gpu")
        return gpu_op
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def make_step(fn: Callable, mode: str) -> Callable:
    if mode == "fwd":
        return jax.jit(fn)

    def loss(q, k, v, do):
        return jnp.vdot(fn(q, k, v).astype(jnp.float32), do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def inputs(seed: int, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, head_dim), dtype)
    do = jax.random.normal(ks[3], (batch, seq, heads, head_dim), dtype)
    return q, k, v, do


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    fwd = batch * model_config.attention_flops(seq, seq, heads, head_dim, causal=causal)
    return fwd if mode == "fwd" else 3.0 * fwd


def compiled_mib(step: Callable, args) -> float | None:
    try:
        m = step.lower(*args).compile().memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2**20
    except Exception:  # some backends have no memory analysis
        return None


def time_ms(step: Callable, args, *, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else text[:80]


def bench(args) -> list[Row]:
    rows = []
    dtype = jnp.dtype(args.dtype)
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        q, k, v, do = inputs(0, batch, seq, args.heads, args.kv_heads, args.head_dim, dtype)
        scale = args.head_dim**-0.5
        for mode in args.modes:
            for impl in args.impls:
                row = Row(impl, mode, seq, batch, args.heads, args.kv_heads, args.head_dim,
                          args.dtype)
                try:
                    fn = attention_fn(impl, causal=True, sm_scale=scale)
                    step = make_step(fn, mode)
                    call_args = (q, k, v) if mode == "fwd" else (q, k, v, do)
                    row.mem_mib = compiled_mib(step, call_args)
                    row.ms = time_ms(step, call_args, warmup=args.warmup, iters=args.iters)
                    flops = attention_flops(batch, seq, args.heads, args.head_dim, True, mode)
                    row.tflops = flops / (row.ms * 1e-3) / 1e12
                except Exception as e:  # report and continue: one failing impl ≠ no table
                    row.error = _short(e)
                rows.append(row)
                print_row(row, flush=True)
    return rows


def cpu_check(args) -> list[Row]:
    """Tiny-size correctness of every implementation this host can run, vs mha_reference."""
    rows = []
    for seq, heads, kv_heads, head_dim in ((128, 2, 2, 64), (200, 4, 2, 128)):
        q, k, v, do = inputs(1, 1, seq, heads, kv_heads, head_dim, jnp.float32)
        scale = head_dim**-0.5
        ref = make_step(attention_fn("xla", causal=True, sm_scale=scale), "fwd+bwd")
        want = ref(q, k, v, do)
        want_out = mha_reference(q, k, v, causal=True, sm_scale=scale)
        for impl in args.impls:
            for mode in args.modes:
                row = Row(impl, mode, seq, 1, heads, kv_heads, head_dim, "float32")
                try:
                    if impl == "jax_pallas" and seq % 128:
                        raise RuntimeError("needs seq % 128 == 0")
                    fn = attention_fn(impl, causal=True, sm_scale=scale, interpret=True)
                    step = make_step(fn, mode)
                    t0 = time.perf_counter()
                    if mode == "fwd":
                        got, expect = [step(q, k, v)], [want_out]
                    else:
                        got, expect = step(q, k, v, do), want
                    row.ms = (time.perf_counter() - t0) * 1e3
                    row.max_err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                      for a, b in zip(got, expect))
                except Exception as e:
                    row.error = _short(e)
                rows.append(row)
                print_row(row, flush=True)
    return rows


HEADER = (f"{'impl':<11}{'mode':<9}{'seq':>6}{'batch':>6}{'ms':>10}{'TFLOP/s':>9}"
          f"{'mem MiB':>10}{'max err':>10}  note")


def print_row(row: Row, flush: bool = False) -> None:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    print(f"{row.impl:<11}{row.mode:<9}{row.seq:>6}{row.batch:>6}{f(row.ms, '.3f'):>10}"
          f"{f(row.tflops, '.1f'):>9}{f(row.mem_mib, '.0f'):>10}{f(row.max_err, '.1e'):>10}"
          f"  {row.error or ''}", flush=flush)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Attention benchmark (see module docstring).")
    p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // seq)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS))
    p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", help="write all rows to this file")
    p.add_argument("--cpu-check", action="store_true",
                   help="tiny-size correctness check in interpret mode (no accelerator needed)")
    args = p.parse_args(argv)
    for impl in args.impls:
        if impl not in IMPLS:
            p.error(f"unknown impl {impl!r}; choose from {','.join(IMPLS)}")
    platform = jax.default_backend()
    if not args.cpu_check and platform not in ("gpu", "tpu"):
        print(f"No GPU/TPU here (jax backend: {platform}); timings would be meaningless. "
              "Run on an accelerator, or use --cpu-check for the correctness check.")
        return 2
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}")
    print(HEADER)
    rows = cpu_check(args) if args.cpu_check else bench(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device.device_kind, "platform": platform,
                       "jax": jax.__version__, "rows": [dataclasses.asdict(r) for r in rows]},
                      fh, indent=1)
    if args.cpu_check:
        bad = [r for r in rows if r.max_err is not None and r.max_err > 1e-4]
        if bad:
            print(f"FAILED: {len(bad)} implementation(s) disagree with the reference")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
