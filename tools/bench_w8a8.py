"""Does an integer format make the model faster on this CPU? W8A8 vs fp32 vs int8 weight-only.

    python -m tools.bench_w8a8 --run_dir=runs/quickstart [--rows=1,8] [--prefill=256]
        [--decode=32] [--repeats=5] [--matmul_repeats=50] [--eval_batches=8] [--threads=0]
        [--out=w8a8.json]

Two parts, all in one process with every variant timed interleaved (A, B, C, A, B, C, ...),
best of `repeats` (`matmul_repeats` for the single matmuls, which take microseconds):

1. Minimal reproduction, one matmul y [T, N] = x [T, K] . W [K, N] at the run's own weight
   shapes: fp32 `jnp.dot`; the bare int8 x int8 -> int32 `lax.dot_general`; and the full W8A8
   product (`QArray.matmul_2d`: per-token activation quantization + int8 dot + rescale), for T
   = 1 (decode), rows x prefill (prefill); and how XLA lowered the int8 dot (a native s8 x s8
   dot, or both operands widened to s32 first, as XLA:CPU does for T = 1).
2. The decoder: prefill tokens/s (one jitted forward over [rows, prefill]) and decode tokens/s
   (the KV-cache sampler, greedy, `decode` new tokens after a 16-token prompt, rows prompts)
   of fp32, int8 weight-only (dequantize-on-the-fly) and W8A8; plus each variant's validation
   perplexity on the first `eval_batches` batches (the quality side of the trade).

--threads=N pins the process to the first N CPUs (0: all). Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.data.sources import DataError
from llm.model import transformer
from llm.runs import load_run
from llm.serve.sampler import generate


def _best(fns: dict, args: dict, repeats: int) -> dict[str, float]:
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            times[name].append(time.perf_counter() - t)
    return {name: min(t) for name, t in times.items()}


def matmul_shapes(params: dict, axes: dict) -> list[tuple[str, int, int]]:
    """[(name, K, N)] of the distinct quantized weight shapes of the model."""
    q = Q.quantize_params(params, axes, method="int8")
    seen = {}
    for path, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=Q.is_qarray)[0]:
        if Q.is_qarray(x):
            k, n = x.codes.shape
            seen.setdefault((k, n), "/".join(Q._path_names(path)).replace("/kernel", ""))
    return [(name, k, n) for (k, n), name in seen.items()]


def bench_matmuls(shapes, tokens: list[int], repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    f32 = jax.jit(lambda x, w: jnp.dot(x, w))
    i8 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                                  preferred_element_type=jnp.int32))
    w8a8 = jax.jit(lambda x, q: q.matmul_2d(x))
    rows = []
    for name, k, n in shapes:
        w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
        q = Q.quantize(w, (0,), "int8").replace(activations="int8")
        for t in tokens:
            x = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
            xi = jnp.asarray(rng.integers(-127, 128, size=(t, k)), jnp.int8)
            best = _best({"fp32": f32, "int8_dot": i8, "w8a8": w8a8},
                         {"fp32": (x, w), "int8_dot": (xi, q.codes), "w8a8": (x, q)}, repeats)
            hlo = i8.lower(xi, q.codes).compile().as_text()
            widened = any("convert(" in line and "s32" in line for line in hlo.splitlines())
            rows.append({"weight": name, "T": t, "K": k, "N": n,
                         "int8_dot_lowering": "widened to s32" if widened else "s8 x s8 dot",
                         **{f"{v}_us": 1e6 * s for v, s in best.items()},
                         "int8_dot_speedup": best["fp32"] / best["int8_dot"],
                         "w8a8_speedup": best["fp32"] / best["w8a8"]})
    return rows


def bench_model(run, variants: dict, rows: list[int], prefill: int, decode: int,
                repeats: int) -> list[dict]:
    forward = jax.jit(lambda p, x: transformer.apply(run.graphdef, p, x))
    out = []
    for r in rows:
        ids = jnp.asarray((np.arange(r * prefill, dtype=np.int32).reshape(r, prefill) * 7)
                          % run.cfg.vocab_size)
        best = _best({n: forward for n in variants}, {n: (p, ids) for n, p in variants.items()},
                     repeats)
        prompts = [[int(t) for t in np.asarray(ids[i, :16])] for i in range(r)]

        def gen(p, prompts=prompts):
            return jnp.asarray(generate(run.graphdef, p, run.cfg, prompts, max_new_tokens=decode,
                                        temperature=0.0, eos_id=-1))

        dec = _best({n: gen for n in variants}, {n: (p,) for n, p in variants.items()}, repeats)
        for n in variants:
            out.append({"variant": n, "rows": r,
                        "prefill_tokens_per_s": r * prefill / best[n],
                        "decode_tokens_per_s": r * decode / dec[n]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_w8a8",
                                description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul_repeats", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        if a.threads:
            os.sched_setaffinity(0, set(range(a.threads)))
        rows = [int(r) for r in a.rows.split(",")]
        run = load_run(a.run_dir)
        if a.prefill > run.seq_len:
            raise ConfigError(f"--prefill={a.prefill} is longer than the run's training length "
                              f"{run.seq_len}; use at most {run.seq_len}.")
        _, _, axes = transformer.abstract(run.cfg)
        w8 = Q.quantize_params(run.params, axes, method="int8")
        variants = {"fp32": run.params, "int8 weight-only": w8,
                    "w8a8": Q.int8_activations(w8)}
        load = [os.getloadavg()[0]]
        mm = bench_matmuls(matmul_shapes(run.params, axes),
                           [1, a.prefill, *[r * a.prefill for r in rows if r > 1]],
                           a.matmul_repeats)
        model = bench_model(run, variants, rows, a.prefill, a.decode, a.repeats)
        load.append(os.getloadavg()[0])
        quality = {}
        if a.eval_batches:
            from experiments.compress import validation_metrics

            data_dir = run.manifest.get("data", {}).get("data_dir", "")
            for n, params in variants.items():
                quality[n] = validation_metrics(run, params, data_dir, batch_size=8,
                                                max_batches=a.eval_batches)
    except (ConfigError, DataError) as e:
        print(f"bench_w8a8: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    threads = len(os.sched_getaffinity(0))
    print(f"\n{run.name} step {run.step}; backend {jax.default_backend()}, {threads} CPUs, "
          f"best of {a.repeats} ({a.matmul_repeats} per matmul) interleaved, load average "
          f"{load[0]:.1f} -> {load[1]:.1f}")
    print("\n| weight | T | K x N | fp32 us | int8 dot us | W8A8 us | int8 dot x | W8A8 x | "
          "XLA int8 dot |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in mm:
        print(f"| {r['weight']} | {r['T']} | {r['K']}x{r['N']} | {r['fp32_us']:.0f} | "
              f"{r['int8_dot_us']:.0f} | {r['w8a8_us']:.0f} | {r['int8_dot_speedup']:.2f} | "
              f"{r['w8a8_speedup']:.2f} | {r['int8_dot_lowering']} |")
    print("\n| variant | rows | prefill tok/s | x fp32 | decode tok/s | x fp32 | val ppl |")
    print("|---|---|---|---|---|---|---|")
    for r in model:
        base = next(x for x in model if x["variant"] == "fp32" and x["rows"] == r["rows"])
        ppl = quality.get(r["variant"], {}).get("perplexity", float("nan"))
        print(f"| {r['variant']} | {r['rows']} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f} | "
              f"{r['decode_tokens_per_s']:.0f} | "
              f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} | {ppl:.4f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"run_dir": run.run_dir, "step": run.step, "threads": threads,
                       "repeats": a.repeats, "matmul_repeats": a.matmul_repeats,
                       "load_average_1m": load, "matmuls": mm,
                       "model": model, "quality": quality,
                       "command": " ".join(["python -m tools.bench_w8a8", *sys.argv[1:]])},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
