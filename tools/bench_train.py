"""Training-step throughput of named model configs, and of a hand-written PyTorch twin.

  .venv/bin/python tools/bench_train.py --configs gpt2_tiny,llama_tiny --steps 8 \
      --torch_python /tmp/torchvenv/bin/python --json bench_train.json

For each config (a gin file under gin_configs/models/) it builds the real training state and
`jit_train_step` on one device (AdamW + clipping from `llm.train.optimizer`, the decoder
next-token loss) and times full optimizer steps on a fixed synthetic batch:

  compile s   lower + compile of the step;
  step ms     median wall time of one step (each step is waited for);
  tokens/s    batch * seq / median step;
  cpu ms      median process CPU time of one step, all threads (robust to a busy machine when
              run on one thread; with several it also counts spin-waiting);
  MFU         model FLOPs (`ModelConfig.flops_per_token`, 6N + attention) per second, divided by
              the FLOP/s of a large fp32 matmul (`llm.train.metrics.measure_matmul_flops`)
              measured in this process on the same device, once before the steps and once
              after every round of steps (median of all).

With --torch_python (an interpreter that has torch; PyTorch is not a dependency of `llm`) the
GPT-2-style configs are also run by `tools/torch_twin.py` in a subprocess. The twin and ours are
timed interleaved, --round steps of one then --round steps of the other, so machine noise hits
both alike; the ratio ours/twin is of the medians. Without it the twin is skipped with a note.

--profile N prints the N slowest HLO ops of each step (jax.profiler trace; with one XLA thread
they add up to the step), with the JAX op each came from: that is how the figures in
docs/benchmarks.md ("Training step (CPU)") were found.

--gin_param overrides the model config for every config (e.g. 'ModelConfig.dtype="bfloat16"').
XLA flags go in the environment (XLA_FLAGS=...), as for any JAX program.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm.model import transformer  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402
from llm.parallel.mesh import make_mesh  # noqa: E402
from llm.parallel.rules import axis_rules  # noqa: E402
from llm.train.loss import decoder_loss  # noqa: E402
from llm.train.metrics import measure_matmul_flops  # noqa: E402
from llm.train.optimizer import make_optimizer  # noqa: E402
from llm.train.state import create_train_state  # noqa: E402
from llm.train.step import batch_sharding, jit_train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWIN = os.path.join(ROOT, "tools", "torch_twin.py")


@dataclasses.dataclass
class Result:
    config: str
    params: int
    batch: int
    seq: int
    dtype: str
    flops_per_token: float
    compile_s: float
    step_ms: float
    tokens_per_s: float
    matmul_gflops: float
    mfu: float
    loss_first: float
    loss_last: float
    cpu_ms: float  # median process CPU time per step (all threads)
    step_ms_min: float
    step_ms_all: list[float]
    twin_step_ms: float | None = None
    twin_cpu_ms: float | None = None
    twin_step_ms_min: float | None = None
    twin_tokens_per_s: float | None = None
    twin_params: int | None = None
    ratio: float | None = None  # ours / twin tokens/s (wall clock)
    cpu_ratio: float | None = None  # twin / ours CPU time per step
    twin_note: str | None = None
    profile: list[dict] | None = None  # --profile: the slowest HLO ops, ms per step


def load_config(name: str, overrides: list[str]) -> ModelConfig:
    """ModelConfig from gin_configs/models/<name>.gin plus --gin_param overrides."""
    gin.clear_config()
    gin.parse_config_file(os.path.join(ROOT, "gin_configs", "models", f"{name}.gin"))
    gin.parse_config(overrides)
    return ModelConfig()


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform random tokens, one document per row, every target counted."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def build_step(cfg: ModelConfig, batch: int, seq: int, total_steps: int):
    """(compiled step, state, device batch, compile seconds) on the first device."""
    gin.parse_config(["make_mesh.data = 1"])
    mesh = make_mesh(devices=jax.devices()[:1])
    rules = axis_rules()
    graphdef, abstract_params, axes = transformer.abstract(cfg)
    tx, schedule = make_optimizer(total_steps=total_steps)
    state, shardings = create_train_state(lambda k: transformer.init(cfg, k)[1], abstract_params,
                                          axes, tx, mesh, rules, seed=0)
    step = jit_train_step(shardings, mesh, rules, loss_fn=decoder_loss(graphdef), tx=tx,
                          schedule=schedule)
    data = jax.device_put(synthetic_batch(batch, seq, cfg.vocab_size),
                          batch_sharding(mesh, rules))
    t = time.perf_counter()
    compiled = step.lower(state, data).compile()
    return compiled, state, data, time.perf_counter() - t


class Twin:
    """The PyTorch twin in a subprocess, driven one JSON line at a time."""

    def __init__(self, python: str, cfg: ModelConfig, batch: int, seq: int, total_steps: int,
                 extra: list[str]):
        args = [python, TWIN, "--serve", f"--vocab={cfg.vocab_size}",
                f"--d_model={cfg.d_model}", f"--layers={cfg.num_layers}",
                f"--heads={cfg.num_heads}", f"--hidden={cfg.hidden_dim}",
                f"--max_seq_len={cfg.max_seq_len}", f"--eps={cfg.norm_eps}",
                f"--batch={batch}", f"--seq={seq}", f"--total_steps={total_steps}", *extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch twin exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, steps: int) -> tuple[list[float], list[float]]:
        """(wall seconds, CPU seconds) per step."""
        self.proc.stdin.write(json.dumps({"cmd": "run", "steps": steps}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["times"], out["cpu"]

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def twin_unsupported(cfg: ModelConfig) -> str | None:
    """Why the twin cannot run this config (it is GPT-2-style only), or None."""
    want = dict(norm="layernorm", position="learned", activation="gelu", use_bias=True,
                tie_embeddings=True, kv_heads=cfg.num_heads, dtype="float32")
    bad = [k for k, v in want.items() if getattr(cfg, k) != v]
    return f"twin is GPT-2-style fp32 only (differs in {', '.join(bad)})" if bad else None


def bench(name: str, args: argparse.Namespace) -> Result:
    cfg = load_config(name, args.gin_param)
    total = args.warmup + args.steps + 1
    compiled, state, data, compile_s = build_step(cfg, args.batch, args.seq, total)
    matmul = [measure_matmul_flops()]
    note = twin_unsupported(cfg) if args.torch_python else "no --torch_python: twin skipped"
    twin = None
    if args.torch_python and note is None:
        twin = Twin(args.torch_python, cfg, args.batch, args.seq, total, args.twin_arg)
    losses = []

    def ours(n: int) -> tuple[list[float], list[float]]:
        nonlocal state
        times, cpu = [], []
        for _ in range(n):
            t, c = time.perf_counter(), time.process_time()
            state, metrics = compiled(state, data)
            losses.append(float(jax.block_until_ready(metrics["loss"])))
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return times, cpu

    ours(args.warmup)
    if twin:
        twin.run(args.warmup)
    mine, mine_cpu, theirs, theirs_cpu = [], [], [], []
    while len(mine) < args.steps:
        n = min(args.round, args.steps - len(mine))
        wall, cpu = ours(n)
        mine += wall
        mine_cpu += cpu
        if twin:
            wall, cpu = twin.run(n)
            theirs += wall
            theirs_cpu += cpu
        matmul.append(measure_matmul_flops(repeats=3))  # same noise as the steps around it
    if twin:
        twin.close()
    step_s = statistics.median(mine)
    tokens = args.batch * args.seq
    peak = statistics.median(matmul)
    fpt = cfg.flops_per_token(args.seq)
    result = Result(
        config=name, params=cfg.num_params(), batch=args.batch, seq=args.seq, dtype=cfg.dtype,
        flops_per_token=fpt, compile_s=compile_s, step_ms=step_s * 1e3,
        tokens_per_s=tokens / step_s, matmul_gflops=peak / 1e9,
        mfu=fpt * tokens / step_s / peak, loss_first=losses[0], loss_last=losses[-1],
        cpu_ms=statistics.median(mine_cpu) * 1e3, step_ms_min=min(mine) * 1e3,
        step_ms_all=[t * 1e3 for t in mine], twin_note=note)
    if twin:
        twin_s = statistics.median(theirs)
        result.twin_step_ms = twin_s * 1e3
        result.twin_tokens_per_s = tokens / twin_s
        result.twin_params = twin.info["params"]
        result.ratio = twin_s / step_s
        result.twin_cpu_ms = statistics.median(theirs_cpu) * 1e3
        result.twin_step_ms_min = min(theirs) * 1e3
        result.cpu_ratio = result.twin_cpu_ms / result.cpu_ms
        if twin.info["params"] != result.params:
            result.twin_note = f"param count differs: twin {twin.info['params']:,}"
    if args.profile:
        result.profile, state = op_profile(compiled, state, data, args.profile)
    del state
    return result


def op_profile(compiled, state, data, top: int, steps: int = 2) -> tuple[list[dict], object]:
    """Per-HLO-op wall time of `steps` steps from a jax.profiler trace (XLA:CPU records one
    event per executed thunk), with each op's shape and JAX op name from the compiled HLO.

    Returns (the `top` ops by time per step, the state after the steps). Run it with one thread
    (XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1") so that
    op times add up to the step time.
    """
    meta = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", line)
        if m:
            meta[m.group(1)] = (m.group(2), m.group(3))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(steps):
            state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e["name"] in meta:
            per_op[e["name"]] = per_op.get(e["name"], 0.0) + e["dur"] / 1e3 / steps
    rows = [{"op": k, "ms": v, "shape": meta[k][0], "jax_op": meta[k][1]}
            for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])]
    total = sum(per_op.values())
    matmul = sum(r["ms"] for r in rows if "dot_general" in r["jax_op"] or r["op"].startswith("dot"))
    summary = {"op": "(all ops)", "ms": total, "shape": "", "jax_op": f"matmuls {matmul:.0f} ms"}
    return [summary] + rows[:top], state


def print_table(results: list[Result]) -> None:
    head = (f"{'config':<12} {'params':>10} {'compile s':>9} {'step ms':>8} {'tokens/s':>9} "
            f"{'MFU':>6} {'twin tok/s':>10} {'ours/twin':>9} {'cpu ms':>8} {'twin cpu':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        twin = (f"{r.twin_tokens_per_s:>10,.0f} {r.ratio:>9.2f}" if r.ratio is not None else
                f"{'-':>10} {'-':>9}")
        cpu = f"{r.cpu_ms:>8.0f} " + (f"{r.twin_cpu_ms:>8.0f}" if r.twin_cpu_ms else f"{'-':>8}")
        print(f"{r.config:<12} {r.params:>10,} {r.compile_s:>9.1f} {r.step_ms:>8.1f} "
              f"{r.tokens_per_s:>9,.0f} {r.mfu:>6.1%} {twin} {cpu}")
    for r in results:
        if r.twin_note:
            print(f"  {r.config}: {r.twin_note}")
    for r in results:
        for row in r.profile or []:
            print(f"  {r.config} {row['ms']:8.1f} ms  {row['op']:<28} {row['shape'][:28]:<28} "
                  f"{row['jax_op'][:70]}")
    print("  matmul fp32 GFLOP/s (MFU denominator): "
          + ", ".join(f"{r.config} {r.matmul_gflops:.1f}" for r in results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="gpt2_tiny,llama_tiny",
                   help="comma-separated names of gin_configs/models/*.gin")
    p.add_argument("--steps", type=int, default=8, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--round", type=int, default=2,
                   help="steps per turn when interleaving with the twin")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gin_param", action="append", default=[],
                   help="gin binding applied to every config, e.g. ModelConfig.dtype=\"bfloat16\"")
    p.add_argument("--torch_python", default=None,
                   help="python with torch installed, runs tools/torch_twin.py")
    p.add_argument("--twin_arg", action="append", default=[],
                   help="extra flag for torch_twin.py, e.g. --twin_arg=--fused")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, trace 2 steps with jax.profiler and print the N slowest "
                        "HLO ops (use one thread, see op_profile)")
    p.add_argument("--json", default=None, help="write all results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, batch {args.batch} x seq {args.seq}",
          flush=True)
    results = []
    for name in args.configs.split(","):
        results.append(bench(name.strip(), args))
        r = results[-1]
        print(f"  {r.config}: step {r.step_ms:.1f} ms, loss {r.loss_first:.3f} -> "
              f"{r.loss_last:.3f}", flush=True)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "args": vars(args), "results": [dataclasses.asdict(r) for r in results]},
                      f, indent=1)
    return results


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
