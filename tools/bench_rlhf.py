"""RLHF throughput: rollouts with the KV cache against recomputing the full forward per token,
the GRPO and PPO update steps, and LoRA against full fine-tuning. A table and a JSON record.

  .venv/bin/python -m tools.bench_rlhf --model llama_mini --batch 16 --prompt 32 --new 64 \
      --json rlhf_bench.json

Conditions (printed with the figures): one process, every JAX CPU device of the machine, random
weights of gin_configs/models/<model>.gin with --vocab tokens, fp32, the load average before and
after (other work on a shared machine slows both sides of a ratio alike only if they take turns,
so every comparison here alternates its sides --rounds times and reports medians).

  rollout, KV cache   `llm.posttrain.rollout.rollout`: one jitted prefill + `lax.fori_loop` of
                      one-token decode steps reading the cache (the RL loop's sampler);
  rollout, recompute  the same sampling, but every new token runs the full decoder forward over
                      the whole fixed [batch, prompt + new] buffer (one compiled program, a
                      `lax.fori_loop` too; a growing-prefix recompute would do on average
                      (prompt + new/2) / (prompt + new) of that work, stated beside the ratio);
                      both run greedily here and must produce the same tokens;
  update, GRPO / PPO  one optimizer step of `rl_loop.make_steps` on a [batch, prompt + new]
                      rollout batch (PPO also trains its value model); tokens/s counts every
                      position of the batch;
  LoRA                `tools.bench_lora.run` (full vs LoRA vs QLoRA train steps).
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
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from llm.data.objectives import PAD_ID  # noqa: E402
from llm.model import transformer  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402
from llm.parallel.mesh import make_mesh  # noqa: E402
from llm.parallel.rules import axis_rules, tree_shardings  # noqa: E402
from llm.posttrain import grpo, ppo  # noqa: E402
from llm.posttrain.rl_loop import RLConfig, RLState, init_opt_state, make_steps  # noqa: E402
from llm.posttrain.rollout import pad_prompts, rollout  # noqa: E402
from llm.serve.sampler import sample_token  # noqa: E402
from llm.train.optimizer import make_optimizer  # noqa: E402
from tools import bench_lora  # noqa: E402


def random_params(cfg: ModelConfig, seed: int = 0) -> tuple:
    graphdef, abstract, axes = transformer.abstract(cfg)
    params = jax.jit(lambda k: transformer.init(cfg, k)[1])(jax.random.key(seed))
    return graphdef, params, abstract, axes


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def recompute_generate(graphdef, params, prompts, lengths, *, max_new_tokens: int):
    """Greedy decoding without a cache: each step runs the decoder over the whole fixed buffer
    [batch, prompt + new] and reads the logits at each row's last filled position."""
    batch, prompt_len = prompts.shape
    buf = jnp.concatenate([prompts, jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)], 1)
    # Row i's prompt occupies [0, len_i); new tokens go to len_i + step.
    out = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)

    def body(i, carry):
        buf, out = carry
        logits = transformer.apply(graphdef, params, buf)
        last = jnp.take_along_axis(logits, (lengths + i - 1)[:, None, None], axis=1)[:, 0]
        tok = sample_token(last, jax.random.key(0), 0.0, 0)
        buf = jax.vmap(lambda row, t, at: row.at[at].set(t))(buf, tok, lengths + i)
        return buf, out.at[:, i].set(tok)

    _, out = jax.lax.fori_loop(0, max_new_tokens, body, (buf, out))
    return out


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_rollout(cfg: ModelConfig, graphdef, params, batch: int, prompt: int, new: int,
                  rounds: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = [[PAD_ID, *rng.integers(2, cfg.vocab_size, rng.integers(prompt // 2, prompt))
                .tolist()] for _ in range(batch)]
    padded, lengths, _ = pad_prompts(prompts, prompt)

    def cached():
        return rollout(graphdef, params, cfg, prompts, max_prompt_len=prompt,
                       max_new_tokens=new, rng=jax.random.key(0), temperature=0.0,
                       eos_id=-1).tokens  # eos -1: every row decodes all `new` tokens

    def recompute():
        return recompute_generate(graphdef, params, jnp.asarray(padded), jnp.asarray(lengths),
                                  max_new_tokens=new)

    t0 = time.perf_counter()
    a = cached()
    cached_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = np.asarray(recompute())
    recompute_compile = time.perf_counter() - t0
    got = np.stack([a[i, lengths[i]:lengths[i] + new] for i in range(batch)])
    same = bool(np.array_equal(got, b))
    t_cached, t_recompute = [], []
    for _ in range(rounds):  # alternate the two sides
        t_cached.append(_median_time(cached, 1))
        t_recompute.append(_median_time(recompute, 1))
    tc, tr = statistics.median(t_cached), statistics.median(t_recompute)
    tokens = batch * new
    return {"batch": batch, "prompt": prompt, "new_tokens": new, "greedy_tokens_equal": same,
            "kv_cache_s": tc, "recompute_s": tr, "kv_cache_tokens_per_s": tokens / tc,
            "recompute_tokens_per_s": tokens / tr, "speedup": tr / tc,
            "growing_prefix_work_share": (prompt + new / 2) / (prompt + new),
            "kv_cache_first_call_s": cached_compile,
            "recompute_first_call_s": recompute_compile}


def bench_update(name: str, cfg: ModelConfig, graphdef, params, abstract, axes, batch: int,
                 prompt: int, new: int, rounds: int) -> dict:
    mesh, rules = make_mesh(), axis_rules()
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = tree_shardings(axes, abstract, mesh, rules)
    params = jax.device_put(params, shardings)
    rc = RLConfig(prompts_per_step=batch // 4, samples_per_prompt=4, max_prompt_len=prompt,
                  max_new_tokens=new)
    if name == "grpo":
        algo = grpo.make_algorithm(graphdef, rc)
        trainable = {"policy": jax.tree.map(jnp.copy, params), "value": {}}
    else:
        algo = ppo.make_algorithm(graphdef, rc, ppo.PPOConfig())
        head = jax.device_put({"kernel": jnp.zeros((cfg.d_model,), jnp.float32),
                               "bias": jnp.zeros((), jnp.float32)},
                              NamedSharding(mesh, PartitionSpec()))
        trainable = {"policy": jax.tree.map(jnp.copy, params),
                     "value": {"backbone": jax.tree.map(jnp.copy, params), "head": head}}
    tx, _ = make_optimizer(total_steps=1000)
    state = RLState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                    params=trainable["policy"], value=trainable["value"],
                    opt_state=init_opt_state(tx, trainable, mesh),
                    rng=jax.device_put(jax.random.key_data(jax.random.key(0)), replicated),
                    kl_coef=jax.device_put(jnp.float32(0.05), replicated))
    frozen = {"reference": params}
    seq = prompt + new
    rng = np.random.default_rng(0)
    host = {"tokens": rng.integers(2, cfg.vocab_size, (batch, seq)).astype(np.int32),
            "response_mask": (np.arange(seq)[None] >= prompt).repeat(batch, 0)
            .astype(np.float32),
            "scores": rng.random(batch).astype(np.float32)}
    steps = make_steps(algo, tx, jax.tree.map(lambda x: x.sharding, state),
                       jax.tree.map(lambda x: x.sharding, frozen), host, mesh, rules,
                       lambda policy, f: (policy, f["reference"]))
    prepared = steps.prepare(state, frozen, host)
    idx = jnp.arange(batch, dtype=jnp.int32)
    holder = {"state": state}

    def one():
        holder["state"], m = steps.update(holder["state"], frozen, prepared, idx)
        return m

    t0 = time.perf_counter()
    jax.block_until_ready(one())
    first = time.perf_counter() - t0
    t = _median_time(one, rounds)
    return {"algorithm": name, "batch": batch, "seq": seq, "step_s": t,
            "tokens_per_s": batch * seq / t, "first_call_s": first}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama_mini", help="gin_configs/models/<name>.gin")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt buffer length")
    p.add_argument("--new", type=int, default=64, help="new tokens per rollout")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--lora_rounds", type=int, default=2)
    p.add_argument("--skip_lora", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    cfg = bench_lora.load_model_config(args.model, args.vocab)
    cfg = dataclasses.replace(cfg, attention_impl="xla")
    graphdef, params, abstract, axes = random_params(cfg)
    roll = bench_rollout(cfg, graphdef, params, args.batch, args.prompt, args.new, args.rounds)
    updates = [bench_update(n, cfg, graphdef, params, abstract, axes, args.batch, args.prompt,
                            args.new, args.rounds) for n in ("grpo", "ppo")]
    lora_rows = [] if args.skip_lora else bench_lora.run(
        cfg, batch=args.batch, seq=args.prompt + args.new, rank=8, steps=4,
        rounds=args.lora_rounds, modes=("full", "lora", "qlora-nf4"))
    load_after = os.getloadavg()
    conditions = {"model": args.model, "params": cfg.num_params(), "vocab": args.vocab,
                  "backend": jax.default_backend(), "devices": jax.device_count(),
                  "cpu_count": os.cpu_count(), "dtype": cfg.dtype,
                  "loadavg_before": load_before, "loadavg_after": load_after,
                  "rounds": args.rounds}
    print(f"bench_rlhf: {args.model} ({cfg.num_params() / 1e6:.2f}M params, vocab {args.vocab}), "
          f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print("\n| rollout (greedy) | batch x new | s | tokens/s |\n|---|---|---|---|")
    print(f"| KV cache | {args.batch} x {args.new} | {roll['kv_cache_s']:.3f} | "
          f"{roll['kv_cache_tokens_per_s']:.0f} |")
    print(f"| recompute full forward | {args.batch} x {args.new} | {roll['recompute_s']:.3f} | "
          f"{roll['recompute_tokens_per_s']:.0f} |")
    print(f"\nKV cache / recompute: {roll['speedup']:.1f}x faster (prompt buffer {args.prompt}; "
          f"a growing-prefix recompute does {roll['growing_prefix_work_share']:.2f} of the "
          f"fixed-buffer work, so >= {roll['speedup'] * roll['growing_prefix_work_share']:.1f}x "
          f"against it); same greedy tokens: {roll['greedy_tokens_equal']}")
    print("\n| update step | batch x seq | s | tokens/s |\n|---|---|---|---|")
    for u in updates:
        print(f"| {u['algorithm']} | {u['batch']} x {u['seq']} | {u['step_s']:.3f} | "
              f"{u['tokens_per_s']:.0f} |")
    if lora_rows:
        print("\nLoRA vs full fine-tuning (tools.bench_lora, batch x seq "
              f"{args.batch} x {args.prompt + args.new}):")
        print(bench_lora.format_table(lora_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": conditions, "rollout": roll, "update": updates,
                       "lora": [{k: v for k, v in r.items() if isinstance(v, (int, float, str))}
                                for r in lora_rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
