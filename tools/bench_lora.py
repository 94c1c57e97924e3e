"""LoRA and QLoRA training steps against full fine-tuning: step time and memory, one process.

  .venv/bin/python -m tools.bench_lora --model llama_mini --batch 8 --seq 256 --json lora.json

For a model config (gin_configs/models/<name>.gin, vocabulary --vocab) it builds the real sharded
training state and jitted step of `llm.train.experiment.train_and_evaluate` for each mode:

  full    every parameter trained (the configured optimizer, default AdamW);
  lora    rank --rank adapters on every attention and MLP projection, base frozen
          (`llm.train.lora`, the default LoraConfig.targets);
  qlora-* the same with the adapted base kernels quantized (nf4, int8) and dequantized in the step;

and reports, per mode:

  trainable      trained parameters (and their share of full fine-tuning's);
  opt MiB        optimizer-state bytes (Adam moments ... ; share of full's);
  state MiB      everything the step keeps between steps: trained params + optimizer state + the
                 frozen base (quantized for QLoRA);
  XLA temp MiB   the compiled step's scratch memory (`memory_analysis().temp_size_in_bytes`):
                 activations, gradients and, for LoRA, the rebuilt kernels;
  step ms        median wall time of a step, the modes taking turns --round steps at a time so
                 load on a shared machine hits them alike; ratio = step ms / full's step ms.

Memory figures are XLA's accounting of the compiled program (what an accelerator must hold), not
the process RSS. `run(...)` returns the rows; `tools/bench_rlhf.py` calls it for its LoRA section.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llm.model import transformer  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402
from llm.parallel.mesh import make_mesh  # noqa: E402
from llm.parallel.rules import axis_rules, tree_shardings  # noqa: E402
from llm.train import lora  # noqa: E402
from llm.train.loss import decoder_loss  # noqa: E402
from llm.train.optimizer import make_optimizer  # noqa: E402
from llm.train.state import create_train_state  # noqa: E402
from llm.train.step import jit_train_step  # noqa: E402

MiB = 2 ** 20


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _float_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))


def load_model_config(name: str, vocab: int) -> ModelConfig:
    """ModelConfig from gin_configs/models/<name>.gin with vocab_size=vocab."""
    import gin

    from llm.config import parse_gin

    with gin.unlock_config():
        gin.clear_config()
        parse_gin([os.path.join(ROOT, "gin_configs", "models", f"{name}.gin")])
        cfg = ModelConfig()
        gin.clear_config()
    return dataclasses.replace(cfg, vocab_size=vocab)


def _batch(batch: int, seq: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": np.ones((batch, seq), np.float32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}


def build(mode: str, cfg: ModelConfig, rank: int, batch: int, seq: int, steps: int) -> dict:
    """The state, frozen base, jitted step and compiled memory figures of one mode."""
    mesh, rules = make_mesh(), axis_rules()
    graphdef, abstract_params, axes = transformer.abstract(cfg)
    loss_fn = decoder_loss(graphdef)
    tx, schedule = make_optimizer(total_steps=steps)
    init = functools.partial(lambda c, k: transformer.init(c, k)[1], cfg)
    data = {k: jnp.asarray(v) for k, v in _batch(batch, seq, cfg.vocab_size).items()}
    if mode == "full":
        state, shardings = create_train_state(init, abstract_params, axes, tx, mesh, rules, 0)
        step = jit_train_step(shardings, mesh, rules, loss_fn=loss_fn, tx=tx,
                              schedule=schedule)
        frozen, args = None, (state, data)
        trainable = jax.tree.map(lambda x: x, abstract_params)
    else:
        quant = None if mode == "lora" else mode.split("-", 1)[1]
        plan = lora.make_plan(graphdef, abstract_params, axes, lora.LoraConfig(
            enabled=True, rank=rank, alpha=2.0 * rank, quant=quant))
        base_sh = tree_shardings(axes, abstract_params, mesh, rules)
        base = jax.jit(init, out_shardings=base_sh)(jax.random.key(0))
        frozen = jax.jit(functools.partial(lora.freeze, plan))(base)
        del base
        state, shardings = create_train_state(
            functools.partial(lora.init_adapters, plan), lora.abstract_adapters(plan,
                                                                               abstract_params),
            lora.adapter_axes(plan, axes), tx, mesh, rules, 0)
        step = jit_train_step(shardings, mesh, rules,
                              frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen),
                              loss_fn=lora.adapted_loss(plan, loss_fn, 0), tx=tx,
                              schedule=schedule)
        args = (state, data, frozen)
        trainable = lora.abstract_adapters(plan, abstract_params)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    return {"mode": mode, "step": compiled, "state": state, "data": data, "frozen": frozen,
            "compile_s": compile_s,
            "trainable": sum(x.size for x in jax.tree.leaves(trainable)),
            "opt_bytes": _float_bytes(state.opt_state),
            "state_bytes": _bytes(state.params) + _bytes(state.opt_state)
            + (_bytes(frozen) if frozen is not None else 0),
            "temp_bytes": getattr(memory, "temp_size_in_bytes", 0) if memory else 0}


def _run_steps(entry: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        args = (entry["state"], entry["data"]) + (() if entry["frozen"] is None
                                                  else (entry["frozen"],))
        t0 = time.perf_counter()
        entry["state"], metrics = entry["step"](*args)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return times


def run(cfg: ModelConfig, *, batch: int = 8, seq: int = 256, rank: int = 8, steps: int = 6,
        rounds: int = 3, modes: tuple[str, ...] = ("full", "lora", "qlora-nf4")) -> list[dict]:
    """One row per mode (see the module docstring); the first mode is the reference."""
    entries = [build(m, cfg, rank, batch, seq, steps * rounds + 2) for m in modes]
    for e in entries:
        _run_steps(e, 1)  # warm-up
    times = {e["mode"]: [] for e in entries}
    for _ in range(rounds):
        for e in entries:
            times[e["mode"]] += _run_steps(e, steps)
    ref = entries[0]
    ref_ms = 1e3 * statistics.median(times[ref["mode"]])
    rows = []
    for e in entries:
        ms = 1e3 * statistics.median(times[e["mode"]])
        rows.append({"mode": e["mode"], "trainable": e["trainable"],
                     "trainable_frac": e["trainable"] / ref["trainable"],
                     "opt_mib": e["opt_bytes"] / MiB,
                     "opt_frac": e["opt_bytes"] / ref["opt_bytes"],
                     "state_mib": e["state_bytes"] / MiB, "temp_mib": e["temp_bytes"] / MiB,
                     "step_ms": ms, "step_ratio": ms / ref_ms, "compile_s": e["compile_s"],
                     "tokens_per_s": batch * seq / (ms / 1e3)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| mode | trainable (share) | opt MiB (share) | state MiB | XLA temp MiB | step ms "
             "(/ full) | tokens/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['trainable']:,} ({r['trainable_frac']:.3f}) | "
                     f"{r['opt_mib']:.2f} ({r['opt_frac']:.3f}) | {r['state_mib']:.2f} | "
                     f"{r['temp_mib']:.1f} | {r['step_ms']:.1f} ({r['step_ratio']:.2f}) | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama_mini", help="gin_configs/models/<name>.gin")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="full,lora,qlora-nf4,qlora-int8")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = load_model_config(args.model, args.vocab)
    rows = run(cfg, batch=args.batch, seq=args.seq, rank=args.rank, steps=args.steps,
               rounds=args.rounds, modes=tuple(args.modes.split(",")))
    load = os.getloadavg()
    print(f"bench_lora: {args.model} (d_model {cfg.d_model}, {cfg.num_layers} layers, vocab "
          f"{cfg.vocab_size}), batch {args.batch} x seq {args.seq}, rank {args.rank}, "
          f"{jax.devices()[0].platform}, load average {load[0]:.1f}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "seq": args.seq,
                       "rank": args.rank, "load_average": load[0], "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
