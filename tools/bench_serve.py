"""Serving benchmark: the HTTP server under N concurrent streaming clients, and the engine's decode
speed against this repo's plain batch sampler (`llm.serve.sampler.generate`).

    python -m tools.bench_serve --run_dir=runs/quickstart [--clients=1,8,32] [--out=bench.json]
        [--skip_server] [--decode_steps=K]

Server part: starts `python -m llm.serve.server` on a free loopback port (slots = the largest N),
warms it up, then for each N runs N clients that each stream `--requests` completions of
`--max_tokens` tokens (ignore_eos, temperature 0.8, distinct seeds) back to back. Reported per N:
output tokens/s over the wall time, time to first token (request sent -> first SSE chunk) and
inter-token latency (gap between SSE chunks carrying tokens), p50 and p99.

Engine part (in this process, compiled and warm, same prompts and token counts): decode tokens/s
of `Engine.generate` vs `sampler.generate` at batch 1 and at batch `--batch`. The sampler decodes
a fixed batch in one jitted loop with a cache sized to the batch; the engine returns to the host
every `decode_steps` tokens (stop checks, streaming, admission) and prefills each prompt in its
own call. `--skip_server` runs this part only; `--decode_steps` sets the engine's K.

HF transformers `generate` needs an HF export of our weights, which does not exist yet (the
interop issue); the comparison is with the plain sampler meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    """q-th percentile in milliseconds (requests whose stream carried no text are left out)."""
    xs = [x for x in xs if x == x]
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


async def _stream(client, url: str, body: dict) -> tuple[float, list[float], int]:
    """(ttft seconds, chunk arrival times, completion tokens) of one streamed completion."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["text"] for c in chunk["choices"]):
                times.append(time.perf_counter())
    return (times[0] - t0 if times else float("nan")), times, tokens


async def _load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    ttfts, itls, total = [], [], 0

    async def client_loop(client, i):
        nonlocal total
        for k in range(requests):
            ttft, times, n = await _stream(client, url, {
                "model": model, "prompt": f"def function_{i}_{k}(x):\n", "stream": True,
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i * 1000 + k,
                "ignore_eos": True})
            ttfts.append(ttft)
            itls.extend(np.diff(times).tolist())
            total += n

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[client_loop(client, i) for i in range(clients)])
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * requests, "tokens": total,
            "wall_s": wall, "tokens_per_s": total / wall,
            "ttft_p50_ms": _pct(ttfts, 50), "ttft_p99_ms": _pct(ttfts, 99),
            "itl_p50_ms": _pct(itls, 50), "itl_p99_ms": _pct(itls, 99)}


def bench_server(run_dir: str, clients: list[int], requests: int, max_tokens: int) -> list[dict]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm.serve.server", f"--run_dir={run_dir}", f"--port={port}",
         f"--slots={max(clients)}", "--max_queue=4096", "--log_level=warning",
         "--model_name=bench"], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"bench_serve: the server did not start (exit {proc.poll()})")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        asyncio.run(_load(url, "bench", max(clients), 1, 4))  # compile prefill + decode
        return [asyncio.run(_load(url, "bench", n, requests, max_tokens)) for n in clients]
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def bench_engine(run_dir: str, batches: list[int], max_tokens: int, repeats: int,
                 decode_steps: int | None = None) -> list[dict]:
    from llm.runs import load_run
    from llm.serve.engine import BOS_ID, Engine, EngineConfig, SamplingParams
    from llm.serve.sampler import generate

    run = load_run(run_dir)
    prompt = run.tokenizer.encode("def fibonacci(n):\n")
    context = len(prompt) + max_tokens + 1
    out = []
    for batch in batches:
        extra = {} if decode_steps is None else {"decode_steps": decode_steps}
        engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer, EngineConfig(
            slots=batch, max_context=max(context, run.seq_len), chunk_size=32, **extra))
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        prompts = [prompt] * batch

        def run_engine(engine=engine, prompts=prompts, params=params):
            return engine.generate(prompts, params)

        def run_sampler(prompts=prompts):
            return generate(run.graphdef, run.params, run.cfg, [[BOS_ID, *p] for p in prompts],
                            max_new_tokens=max_tokens, temperature=0.0, top_k=0, eos_id=-1)

        times = {"engine": [], "sampler": []}
        run_engine(), run_sampler()  # compile
        for _ in range(repeats):  # interleaved, best of
            for name, fn in (("engine", run_engine), ("sampler", run_sampler)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        e, s = min(times["engine"]), min(times["sampler"])
        out.append({"batch": batch, "new_tokens": max_tokens,
                    "engine_tokens_per_s": batch * max_tokens / e,
                    "sampler_tokens_per_s": batch * max_tokens / s, "engine_over_sampler": s / e})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="engine vs sampler batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode_steps", type=int, default=None,
                        help="EngineConfig.decode_steps for the engine part (default: its default)")
    parser.add_argument("--skip_server", action="store_true",
                        help="only the engine vs sampler part")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()
    server = ([] if args.skip_server else
              bench_server(args.run_dir, clients, args.requests, args.max_tokens))
    engine = bench_engine(args.run_dir, [1, args.batch], args.max_tokens, args.repeats,
                          args.decode_steps)
    print(f"\nload average at start: {load[0]:.1f} ({os.cpu_count()} cores)")
    print(f"{'clients':>8} {'tokens/s':>10} {'TTFT p50':>10} {'TTFT p99':>10} "
          f"{'ITL p50':>9} {'ITL p99':>9}  (ms)")
    for r in server:
        print(f"{r['clients']:>8} {r['tokens_per_s']:>10.1f} {r['ttft_p50_ms']:>10.1f} "
              f"{r['ttft_p99_ms']:>10.1f} {r['itl_p50_ms']:>9.1f} {r['itl_p99_ms']:>9.1f}")
    print(f"\n{'batch':>6} {'engine tok/s':>13} {'sampler tok/s':>14} {'engine/sampler':>15}")
    for r in engine:
        print(f"{r['batch']:>6} {r['engine_tokens_per_s']:>13.1f} "
              f"{r['sampler_tokens_per_s']:>14.1f} {r['engine_over_sampler']:>15.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"run_dir": args.run_dir, "load_average": load, "server": server,
                       "engine_vs_sampler": engine, "max_tokens": args.max_tokens}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
