"""Causal attention alone on CPU, forward and forward + backward, at gpt2_tiny's head shapes:
our XLA formulations against PyTorch's fused SDPA kernel (eager and under torch.compile), same
threads, interleaved. Part (a) of the train-step gap decomposition in docs/benchmarks.md.

  .venv/bin/python tools/bench_blocked_attention.py --seqs 256,1024,2048 --tokens 4096 \\
      --impls cpu_flash,blocked:128x128,materialized,jax_xla \\
      --torch_python /tmp/torchvenv/bin/python --json attention.json

Each point is one layer of the train-step benchmark (`tools/bench_train.py --seqs ... --tokens
4096`): q, k, v [tokens // seq, seq, heads 4, head_dim 64] fp32, causal; "fwd+bwd" is the
gradient of sum(out * w) with respect to q, k and v. Variants (ours, all jitted):

  cpu_flash        `llm.kernels.cpu_attention` (attention_impl="cpu_flash", what "auto" runs on
                   CPU): the C++ flash-attention kernel through XLA FFI, given segment ids (all
                   ones) as the trainer passes them;
  blocked:QxK      `llm.kernels.blocked` (attention_impl="xla_blocked") with block_q x block_k,
                   given segment ids (all ones) as the trainer passes them, so the per-block
                   mask check (`lax.cond`) is on -- what the train step runs;
  blocked_causal:QxK   the same without segment ids (the static causal schedule only);
  blocked:QxK/N    N independent block loops over batch (or head) slices (`splits`,
                   ModelConfig.attention_splits), which XLA:CPU may run on its threads at once;
  materialized     `llm.kernels.reference.mha_reference` (attention_impl="xla"): masked
                   [batch, heads, seq, seq] scores, softmax, autodiff backward;
  jax_xla          `jax.nn.dot_product_attention(is_causal=True, implementation="xla")`.

and, with --torch_python, `tools/torch_attention.py`'s sdpa_eager / sdpa_compiled (the twin's
attention: `F.scaled_dot_product_attention(is_causal=True)` on [b, h, s, d] views).

All variants take turns call by call (ours, then the torch process), so load hits all alike;
the table gives median wall ms, ours / compiled SDPA as a time ratio (> 1: ours is slower), and
XLA's temporaries of forward + backward (`memory_analysis()`). Threads: --threads N pins both
processes to the same N cores; XLA's intra-op threads and torch.get_num_threads() are read back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_SIDE = os.path.join(ROOT, "tools", "torch_attention.py")
sys.path.insert(0, ROOT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="2048", help="comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=4096, help="batch = tokens // seq")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--impls", default="cpu_flash,blocked:128x128,materialized,jax_xla",
                   help="comma-separated variants (see the module docstring)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per variant and point")
    p.add_argument("--threads", type=int, default=0, help="cores for both sides (0: all usable)")
    p.add_argument("--torch_python", default=None, help="python with torch: adds SDPA rows")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    _ARGS = parse_args()
    if _ARGS.threads:  # before jax starts, so XLA sizes its pool from the affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_ARGS.threads])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llm.kernels.blocked import blocked_attention  # noqa: E402
from llm.kernels.reference import mha_reference  # noqa: E402
from tools.bench_train import xla_threads  # noqa: E402
from tools.machine import describe, machine_info  # noqa: E402


def make_variant(spec: str, seg: jax.Array):
    """attention(q, k, v) for one --impls entry."""
    name, _, blocks = spec.partition(":")
    if name in ("blocked", "blocked_causal"):
        blocks, _, splits = (blocks or "128x128").partition("/")
        bq, bk = (int(x) for x in blocks.split("x"))
        ids = seg if name == "blocked" else None
        return lambda q, k, v: blocked_attention(q, k, v, q_segment_ids=ids, kv_segment_ids=ids,
                                                 causal=True, block_q=bq, block_k=bk,
                                                 splits=int(splits or 1))
    if name == "cpu_flash":
        from llm.kernels.cpu_attention import cpu_flash_attention

        return lambda q, k, v: cpu_flash_attention(q, k, v, q_segment_ids=seg,
                                                   kv_segment_ids=seg, causal=True)
    if name == "materialized":
        return lambda q, k, v: mha_reference(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                             causal=True)
    if name == "jax_xla":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="xla")
    raise SystemExit(f"bench_blocked_attention: unknown --impls entry {spec!r}; use "
                     "cpu_flash, blocked:QxK, blocked_causal:QxK, materialized or jax_xla.")


class TorchSide:
    """tools/torch_attention.py in a subprocess, one JSON line at a time."""

    def __init__(self, python: str, threads: int):
        self.proc = subprocess.Popen([python, TORCH_SIDE, f"--threads={threads}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch_attention.py exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def bench_point(seq: int, args: argparse.Namespace, torch_side: TorchSide | None) -> dict:
    batch = args.tokens // seq
    shape = (batch, seq, args.heads, args.head_dim)
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    seg = jnp.ones((batch, seq), jnp.int32)
    ref = jax.jit(make_variant("materialized", seg))(q, k, v)
    rows: dict[str, dict] = {}
    for spec in args.impls.split(","):
        attn = make_variant(spec, seg)
        fwd = jax.jit(attn)
        grad = jax.jit(jax.grad(lambda q, k, v, f=attn: jnp.sum(f(q, k, v) * w),
                                argnums=(0, 1, 2)))
        temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
        err = float(jnp.max(jnp.abs(fwd(q, k, v) - ref)))
        jax.block_until_ready(grad(q, k, v))
        rows[spec] = {"side": "jax", "fn": (fwd, grad), "temp_mib": temp, "max_abs_diff": err,
                      "fwd": [], "grad": []}
    info = {}
    if torch_side:
        info = torch_side.ask({"cmd": "setup", "batch": batch, "seq": seq, "heads": args.heads,
                               "head_dim": args.head_dim})
        for name in info["first_s"]:
            rows[name] = {"side": "torch", "first_s": info["first_s"][name], "fwd": [],
                          "grad": []}
    threads = xla_threads()
    for _ in range(args.iters):
        for row in rows.values():
            if row["side"] != "jax":
                continue
            for fn, key in zip(row["fn"], ("fwd", "grad")):
                t = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                row[key].append((time.perf_counter() - t) * 1e3)
        if torch_side:
            for name, times in torch_side.ask({"cmd": "run"}).items():
                rows[name]["fwd"].append(times["fwd"] * 1e3)
                rows[name]["grad"].append(times["grad"] * 1e3)
    out = {"seq": seq, "batch": batch, "heads": args.heads, "head_dim": args.head_dim,
           "xla_threads": threads, "torch_threads": info.get("threads"),
           "torch": info.get("torch"), "load_avg_after": list(os.getloadavg()), "rows": {}}
    base = rows.get("sdpa_compiled")
    base_grad = statistics.median(base["grad"]) if base else None
    for name, row in rows.items():
        r = {k: v for k, v in row.items() if k != "fn"}
        r["fwd_ms"] = statistics.median(row["fwd"])
        r["grad_ms"] = statistics.median(row["grad"])
        r["grad_vs_sdpa_compiled"] = r["grad_ms"] / base_grad if base_grad else None
        out["rows"][name] = r
    return out


def print_point(p: dict) -> None:
    print(f"\nseq {p['seq']} x batch {p['batch']}, q/k/v [{p['batch']}, {p['seq']}, {p['heads']}, "
          f"{p['head_dim']}] fp32 causal; threads: XLA {p['xla_threads']}, torch "
          f"{p['torch_threads']}; load average after {p['load_avg_after'][0]:.2f}")
    print(f"  {'variant':<22} {'fwd ms':>8} {'fwd+bwd ms':>11} {'/ compiled SDPA':>16} "
          f"{'temp MiB':>9} {'max|diff|':>10}")
    for name, r in p["rows"].items():
        ratio = f"{r['grad_vs_sdpa_compiled']:.2f}x" if r["grad_vs_sdpa_compiled"] else "-"
        temp = f"{r['temp_mib']:.1f}" if "temp_mib" in r else "-"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"  {name:<22} {r['fwd_ms']:8.1f} {r['grad_ms']:11.1f} {ratio:>16} {temp:>9} "
              f"{diff:>10}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    usable = len(os.sched_getaffinity(0))
    print(f"machine: {describe(machine_info())}; {usable} cores for each side; jax "
          f"{jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    torch_side = TorchSide(args.torch_python, usable) if args.torch_python else None
    points = []
    try:
        for s in args.seqs.split(","):
            points.append(bench_point(int(s), args, torch_side))
            print_point(points[-1])
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"jax": jax.__version__, "machine": machine_info(),
                               "xla_flags": os.environ.get("XLA_FLAGS", ""), "args": vars(args),
                               "points": points}, f, indent=1)
    finally:
        if torch_side:
            torch_side.close()
    return points


if __name__ == "__main__":
    main()
