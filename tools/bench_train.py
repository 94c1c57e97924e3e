"""Training-step throughput of named model configs against a hand-written PyTorch twin, eager and
torch.compile'd, interleaved in one run, with a sequence-length sweep at fixed tokens per step.

  .venv/bin/python tools/bench_train.py --configs gpt2_tiny --steps 8 \
      --torch_python /tmp/torchvenv/bin/python --json bench_train.json
  .venv/bin/python tools/bench_train.py --configs gpt2_tiny --seqs 256,512,1024,2048 \
      --tokens 4096 --torch_python /tmp/torchvenv/bin/python --json sweep.json

For each (config, seq) point -- a gin file under gin_configs/models/ -- it builds the real
training state and `jit_train_step` on one device (AdamW + clipping from `llm.train.optimizer`,
the decoder next-token loss) and times full optimizer steps on a fixed synthetic batch:

  attn        the attention the step runs (the config's attention_impl, "auto" resolved:
              cpu_flash, the C++ kernel, on CPU where it builds; docs/kernels.md);
  compile s   lower + compile of the step;
  step ms     median wall time of one step (each step is waited for);
  tokens/s    batch * seq / median step;
  cpu ms      median process CPU time of one step, all threads;
  MFU         model FLOPs (`ModelConfig.flops_per_token`: 6 x matmul parameters + causal
              attention counted half, see its docstring) per second, divided by the FLOP/s of a
              2048^3 fp32 matmul (`llm.train.metrics.measure_matmul_flops`) measured in the same
              process, before the steps and after every round (median of all);
  peak RSS    the process's peak resident memory (ru_maxrss) for this point alone: every point
              runs in a fresh subprocess of this tool, and each twin is a fresh process.

Twins (--torch_python: an interpreter with torch; PyTorch is not a dependency of `llm`): the
GPT-2-style configs are also run by `tools/torch_twin.py` as "eager" and "compiled"
(`torch.compile`; its compile is the first step, reported as "first step s" and never timed).
Ours and each twin take turns, --round steps at a time (ours, eager, compiled, ours, ...), so
machine noise hits all alike; ours/eager and ours/compiled are ratios of median tokens/s.

Threads: --threads N (default: every CPU this process may use) restricts this process -- and so
XLA's intra-op pool, which sizes itself from the CPU affinity -- and the twins (inherited
affinity, plus torch.set_num_threads(N)) to the same N cores. What each side really uses is read
back and printed: XLA's intra-op threads are counted from /proc/self/task (threads named
*XLAEigen) after the first step, torch's from torch.get_num_threads().

--profile N prints the N slowest HLO ops of each step (jax.profiler trace; with one XLA thread
they add up to the step), with the JAX op each came from.

--no_attention replaces softmax(QK^T)V by q + k + v on BOTH sides (ours: `attend` swapped in
this tool's process; the twin: its --no_attention), an elementwise op of the same cost on each:
the step minus attention, for splitting the gap to the twin into attention and everything else
(docs/benchmarks.md; attention alone is timed by tools/bench_blocked_attention.py).

--gin_param overrides the model config for every config (e.g. 'ModelConfig.dtype="bfloat16"',
'ModelConfig.attention_impl="xla"'). XLA flags go in the environment (XLA_FLAGS=...).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWIN = os.path.join(ROOT, "tools", "torch_twin.py")
sys.path.insert(0, ROOT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="gpt2_tiny,llama_tiny",
                   help="comma-separated names of gin_configs/models/*.gin")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side and point")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--round", type=int, default=2,
                   help="steps per turn when interleaving with the twins")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seqs", default=None,
                   help="sequence sweep, e.g. 256,512,1024,2048: batch = --tokens // seq")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step in a --seqs sweep")
    p.add_argument("--threads", type=int, default=0,
                   help="cores for both sides (0: all this process may use)")
    p.add_argument("--gin_param", action="append", default=[],
                   help="gin binding applied to every config, e.g. ModelConfig.dtype=\"bfloat16\"")
    p.add_argument("--torch_python", default=None,
                   help="python with torch installed, runs tools/torch_twin.py")
    p.add_argument("--twins", default="eager,compiled",
                   help="which twins to run with --torch_python (eager, compiled)")
    p.add_argument("--twin_arg", action="append", default=[],
                   help="extra flag for torch_twin.py, e.g. --twin_arg=--fused")
    p.add_argument("--no_attention", action="store_true",
                   help="both sides: attention replaced by q + k + v (the rest of the step)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, trace 2 steps with jax.profiler and print the N slowest "
                        "HLO ops (use one thread, see op_profile)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--point_json", default=None, help=argparse.SUPPRESS)  # internal: one point
    return p.parse_args(argv)


def pin_threads(threads: int) -> int:
    """Restrict this process (and its children) to the first `threads` usable cores, before XLA
    starts; returns the number of cores it may use."""
    cores = sorted(os.sched_getaffinity(0))
    if threads:
        if threads > len(cores):
            raise SystemExit(f"bench_train: --threads={threads} but only {len(cores)} cores are "
                             "usable; pass at most that.")
        os.sched_setaffinity(0, cores[:threads])
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    _ARGS = parse_args()
    pin_threads(_ARGS.threads)  # before jax is imported, so XLA sizes its pool from it

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llm.model import attention, transformer  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402
from llm.parallel.mesh import make_mesh  # noqa: E402
from llm.parallel.rules import axis_rules  # noqa: E402
from llm.train.host_memory import release_free_memory  # noqa: E402
from llm.train.loop import TrainConfig  # noqa: E402
from llm.train.loss import decoder_loss  # noqa: E402
from llm.train.metrics import measure_matmul_flops  # noqa: E402
from llm.train.optimizer import make_optimizer  # noqa: E402
from llm.train.state import create_train_state  # noqa: E402
from llm.train.step import batch_sharding, jit_train_step  # noqa: E402
from tools.machine import describe, machine_info  # noqa: E402


@dataclasses.dataclass
class Side:
    """One PyTorch twin's figures at one point."""

    name: str  # eager | compiled
    step_ms: float
    step_ms_min: float
    cpu_ms: float
    tokens_per_s: float
    ratio: float  # ours / this twin, tokens/s (medians)
    first_step_s: float  # the untimed first step (= torch.compile's compile for "compiled")
    threads: int  # torch.get_num_threads() inside the twin
    interop_threads: int
    peak_rss_mb: float
    params: int
    loss_last: float


@dataclasses.dataclass
class Result:
    config: str
    params: int
    batch: int
    seq: int
    dtype: str
    attention_impl: str
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
    xla_threads: int  # XLA intra-op threads counted after the first step
    usable_cpus: int  # this process's CPU affinity
    peak_rss_mb: float  # this point's process, ru_maxrss
    xla_temp_mb: float  # XLA's temporaries for the step (compiled.memory_analysis())
    twins: list[Side] = dataclasses.field(default_factory=list)
    twin_note: str | None = None
    profile: list[dict] | None = None  # --profile: the slowest HLO ops, ms per step

    def twin(self, name: str) -> Side | None:
        return next((t for t in self.twins if t.name == name), None)



def xla_threads() -> int:
    """XLA:CPU intra-op threads of this process, counted by name in /proc/self/task."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += "XLAEigen" in f.read()
        except OSError:
            pass
    return n


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    chunk = TrainConfig(global_batch_size=batch, seq_len=seq).loss_chunk  # gin: --gin_param
    step = jit_train_step(shardings, mesh, rules, loss_fn=decoder_loss(graphdef, chunk=chunk),
                          tx=tx, schedule=schedule)
    data = jax.device_put(synthetic_batch(batch, seq, cfg.vocab_size),
                          batch_sharding(mesh, rules))
    t = time.perf_counter()
    compiled = step.lower(state, data).compile()
    return compiled, state, data, time.perf_counter() - t


class Twin:
    """The PyTorch twin in a subprocess, driven one JSON line at a time."""

    def __init__(self, python: str, cfg: ModelConfig, batch: int, seq: int, total_steps: int,
                 threads: int, extra: list[str]):
        args = [python, TWIN, "--serve", f"--vocab={cfg.vocab_size}",
                f"--d_model={cfg.d_model}", f"--layers={cfg.num_layers}",
                f"--heads={cfg.num_heads}", f"--hidden={cfg.hidden_dim}",
                f"--max_seq_len={cfg.max_seq_len}", f"--eps={cfg.norm_eps}",
                f"--batch={batch}", f"--seq={seq}", f"--total_steps={total_steps}",
                f"--threads={threads}", *extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()
        self.rss_mb = 0.0
        self.loss = float("nan")

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
        self.rss_mb, self.loss = out["max_rss_mb"], out["loss"]
        return out["times"], out["cpu"]

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def swap_out_attention(cfg: ModelConfig) -> None:
    """--no_attention: every `attend` call of this process returns q + k + v
    ([batch, seq, heads, head_dim]; the twin's --no_attention adds its q, k, v alike), so the
    step keeps its projections, norms, MLPs, loss and optimizer and loses only the mixing across
    positions."""
    if cfg.kv_heads != cfg.num_heads:
        raise SystemExit("bench_train: --no_attention needs num_kv_heads == num_heads.")
    attention.attend = lambda q, k, v, **_: q + k + v


def resolved_impl(cfg: ModelConfig, batch: int, seq: int) -> str:
    """The attention the step runs: "auto" resolved as `attention.attend` does on CPU."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    q = jax.ShapeDtypeStruct((batch, seq, cfg.num_heads, cfg.dim_per_head), jnp.dtype(cfg.dtype))
    k = jax.ShapeDtypeStruct((batch, seq, cfg.kv_heads, cfg.dim_per_head), jnp.dtype(cfg.dtype))
    if jax.default_backend() == "cpu" and not attention.cpu_kernel_unusable(q, k, None):
        return "cpu_flash"
    return attention.resolve_impl("auto", seq, seq)


def twin_unsupported(cfg: ModelConfig) -> str | None:
    """Why the twin cannot run this config (it is GPT-2-style only), or None."""
    want = dict(norm="layernorm", position="learned", activation="gelu", use_bias=True,
                tie_embeddings=True, kv_heads=cfg.num_heads, dtype="float32")
    bad = [k for k, v in want.items() if getattr(cfg, k) != v]
    return f"twin is GPT-2-style fp32 only (differs in {', '.join(bad)})" if bad else None


def bench(name: str, batch: int, seq: int, args: argparse.Namespace) -> Result:
    """One (config, seq) point: ours and the twins, interleaved."""
    cfg = load_config(name, args.gin_param)
    if cfg.position == "learned" and seq > cfg.max_seq_len:
        raise SystemExit(f"bench_train: seq {seq} is longer than {name}'s learned position table "
                         f"(ModelConfig.max_seq_len={cfg.max_seq_len}); pass "
                         f"--gin_param=ModelConfig.max_seq_len={seq} (both sides get it).")
    total = args.warmup + args.steps + 1
    if args.no_attention:
        swap_out_attention(cfg)  # this process runs one bench point only
    compiled, state, data, compile_s = build_step(cfg, batch, seq, total)
    memory = compiled.memory_analysis()
    matmul = [measure_matmul_flops()]
    release_free_memory()  # the compiler's freed scratch, as the training loop does
    usable = len(os.sched_getaffinity(0))
    note = twin_unsupported(cfg) if args.torch_python else "no --torch_python: twin skipped"
    twins: dict[str, Twin] = {}
    if args.torch_python and note is None:
        for kind in args.twins.split(","):
            extra = ["--compile"] if kind == "compiled" else []
            extra += ["--no_attention"] if args.no_attention else []
            twins[kind] = Twin(args.torch_python, cfg, batch, seq, total, usable,
                               extra + args.twin_arg)
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

    ours(max(args.warmup, 1))
    threads = xla_threads()
    for twin in twins.values():
        twin.run(args.warmup)
    mine, mine_cpu = [], []
    theirs = {k: ([], []) for k in twins}
    while len(mine) < args.steps:
        n = min(args.round, args.steps - len(mine))
        wall, cpu = ours(n)
        mine += wall
        mine_cpu += cpu
        for kind, twin in twins.items():
            wall, cpu = twin.run(n)
            theirs[kind][0].extend(wall)
            theirs[kind][1].extend(cpu)
        matmul.append(measure_matmul_flops(repeats=3))  # same noise as the steps around it
    for twin in twins.values():
        twin.close()
    step_s = statistics.median(mine)
    tokens = batch * seq
    peak = statistics.median(matmul)
    fpt = cfg.flops_per_token(seq)
    result = Result(
        config=name, params=cfg.num_params(), batch=batch, seq=seq, dtype=cfg.dtype,
        attention_impl="q+k+v" if args.no_attention else resolved_impl(cfg, batch, seq),
        flops_per_token=fpt, compile_s=compile_s,
        step_ms=step_s * 1e3, tokens_per_s=tokens / step_s, matmul_gflops=peak / 1e9,
        mfu=fpt * tokens / step_s / peak, loss_first=losses[0], loss_last=losses[-1],
        cpu_ms=statistics.median(mine_cpu) * 1e3, step_ms_min=min(mine) * 1e3,
        step_ms_all=[t * 1e3 for t in mine], xla_threads=threads, usable_cpus=usable,
        peak_rss_mb=peak_rss_mb(), xla_temp_mb=memory.temp_size_in_bytes / 2**20,
        twin_note=note)
    for kind, twin in twins.items():
        wall, cpu = theirs[kind]
        twin_s = statistics.median(wall)
        result.twins.append(Side(
            name=kind, step_ms=twin_s * 1e3, step_ms_min=min(wall) * 1e3,
            cpu_ms=statistics.median(cpu) * 1e3, tokens_per_s=tokens / twin_s,
            ratio=twin_s / step_s, first_step_s=twin.info["first_step_s"],
            threads=twin.info["threads"], interop_threads=twin.info["interop_threads"],
            peak_rss_mb=twin.rss_mb, params=twin.info["params"], loss_last=twin.loss))
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
    head = (f"{'config':<10} {'seq':>5} {'batch':>5} {'attn':<11} {'compile s':>9} "
            f"{'step ms':>8} {'tokens/s':>9} {'MFU':>6} {'RSS MB':>7} {'thr':>3} | "
            f"{'eager tok/s':>11} {'ours/eager':>10} {'compiled tok/s':>14} "
            f"{'ours/compiled':>13} {'RSS MB e/c':>11} {'thr e/c':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        e, c = r.twin("eager"), r.twin("compiled")
        cols = []
        for t in (e, c):
            width = 11 if t is e else 14
            cols.append(f"{t.tokens_per_s:>{width},.0f} " if t else f"{'-':>{width}} ")
            cols.append(f"{t.ratio:>{10 if t is e else 13}.2f}" if t else
                        f"{'-':>{10 if t is e else 13}}")
        rss = "/".join(f"{t.peak_rss_mb:.0f}" for t in (e, c) if t) or "-"
        thr = "/".join(str(t.threads) for t in (e, c) if t) or "-"
        print(f"{r.config:<10} {r.seq:>5} {r.batch:>5} {r.attention_impl:<11} "
              f"{r.compile_s:>9.1f} {r.step_ms:>8.1f} {r.tokens_per_s:>9,.0f} {r.mfu:>6.1%} "
              f"{r.peak_rss_mb:>7.0f} {r.xla_threads:>3} | {cols[0]}{cols[1]} {cols[2]}{cols[3]} "
              f"{rss:>11} {thr:>7}")
    for r in results:
        if r.twin_note:
            print(f"  {r.config}: {r.twin_note}")
        c = r.twin("compiled")
        if c:
            print(f"  {r.config} seq {r.seq}: torch.compile first step {c.first_step_s:.1f} s "
                  f"(untimed); cpu ms/step ours {r.cpu_ms:.0f}, "
                  + ", ".join(f"{t.name} {t.cpu_ms:.0f}" for t in r.twins))
    for r in results:
        for row in r.profile or []:
            print(f"  {r.config} {row['ms']:8.1f} ms  {row['op']:<28} {row['shape'][:28]:<28} "
                  f"{row['jax_op'][:70]}")
    print("  threads: ours = XLA intra-op threads counted in /proc/self/task; twins = "
          "torch.get_num_threads()")
    print("  matmul fp32 GFLOP/s (MFU denominator): "
          + ", ".join(f"{r.config}/{r.seq} {r.matmul_gflops:.1f}" for r in results))


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(config, batch, seq) of every point to measure."""
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if args.seqs:
        shape = []
        for s in args.seqs.split(","):
            seq = int(s)
            if args.tokens % seq:
                raise SystemExit(f"bench_train: --tokens={args.tokens} is not a multiple of "
                                 f"seq {seq}; pick --tokens divisible by every --seqs value.")
            shape.append((args.tokens // seq, seq))
    else:
        shape = [(args.batch, args.seq)]
    return [(n, b, s) for n in names for b, s in shape]


def run_point(name: str, batch: int, seq: int, argv: list[str]) -> Result:
    """Measure one point in a fresh process (so peak RSS is this point's alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "point.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--configs={name}",
               f"--batch={batch}", f"--seq={seq}", f"--point_json={out}"]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            d = json.load(f)
    d["twins"] = [Side(**t) for t in d["twins"]]
    return Result(**d)


def strip_point_args(argv: list[str]) -> list[str]:
    """argv without the options that select points (run_point sets them per point)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=")[0]
        if key in ("--configs", "--batch", "--seq", "--seqs", "--tokens", "--json"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> list[Result]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    usable = pin_threads(args.threads)
    if args.point_json:  # one point, in this process
        (name,) = args.configs.split(",")
        r = bench(name.strip(), args.batch, args.seq, args)
        print(f"  {r.config} seq {r.seq}: step {r.step_ms:.1f} ms, loss {r.loss_first:.3f} -> "
              f"{r.loss_last:.3f}, peak RSS {r.peak_rss_mb:.0f} MB", flush=True)
        with open(args.point_json, "w") as f:
            json.dump(dataclasses.asdict(r), f)
        return [r]
    machine = machine_info()
    print(f"machine: {describe(machine)}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {usable} cores for each "
          f"side, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    results = []
    for n, b, s in points(args):
        results.append(run_point(n, b, s, strip_point_args(argv)))
        machine_after = machine_info()
        print_table(results[-1:])  # each point as it finishes (a sweep takes a while)
        print(f"  load average now: {' '.join(map(str, machine_after['load_avg']))}",
              flush=True)
        if args.json:  # rewritten after every point, so a cut-short sweep keeps what it had
            with open(args.json, "w") as f:
                json.dump({"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                           "machine": machine, "load_avg_after": machine_after["load_avg"],
                           "args": vars(args),
                           "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    if len(results) > 1:
        print("\nall points:")
        print_table(results)
    return results


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
