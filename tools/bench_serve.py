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

Peer decode part (`--peers`, at batch 1 and `--batch`, in one run on the same weights, greedy, a
fixed number of new tokens after the same BOS + prompt ids): the engine, the plain sampler, HF
transformers
`generate` on the run exported with `llm.interop.hf.export_run` (fp32, KV cache on,
torch's threads = the cores), and llama.cpp (llama-cpp-python, `tools/llamacpp_worker.py` in
whatever interpreter has it, e.g. /tmp/llamacpp-venv) on the GGUF F32 and Q8_0 exports
(`tools/export_gguf.py`, batch 1 only), all timed interleaved, best of `--repeats`; each also
reports how many of its tokens equal the engine's. A peer that is not installed is skipped with
the reason.
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

    ttfts, itls, total, slowest = [], [], 0, []
    t0 = time.perf_counter()

    async def client_loop(client, i):
        nonlocal total
        for k in range(requests):
            sent = time.perf_counter()
            ttft, times, n = await _stream(client, url, {
                "model": model, "prompt": f"def function_{i}_{k}(x):\n", "stream": True,
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i * 1000 + k,
                "ignore_eos": True, "stream_options": {"include_usage": True}})
            ttfts.append(ttft)
            itls.extend(np.diff(times).tolist())
            total += n
            slowest.append((ttft, sent - t0, i, k))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[client_loop(client, i) for i in range(clients)])
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * requests, "tokens": total,
            "wall_s": wall, "tokens_per_s": total / wall,
            "ttft_p50_ms": _pct(ttfts, 50), "ttft_p99_ms": _pct(ttfts, 99),
            "itl_p50_ms": _pct(itls, 50), "itl_p99_ms": _pct(itls, 99),
            # The slowest first tokens: (ttft s, sent at s after the start, client, request).
            "slowest_ttft": sorted(slowest, key=lambda x: -x[0] if x[0] == x[0] else 0)[:5]}


def _scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {sample name with labels: value}."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _stalls(before: dict, after: dict) -> dict:
    """What happened in the server during one measured level: programs compiled (and the wall
    time of the engine steps that compiled them), event-loop wake-ups late by more than 100 ms,
    GC pauses and their total, from the differences of two /metrics scrapes."""
    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {"compiles": int(delta("llm_engine_compiled_programs")),
            "compile_step_s": delta("llm_engine_compile_step_seconds"),
            "loop_lags_over_100ms": int(delta("llm_event_loop_lag_seconds_count")
                                        - delta('llm_event_loop_lag_seconds_bucket{le="0.1"}')),
            "loop_lag_s": delta("llm_event_loop_lag_seconds_sum"),
            "gc_pauses": int(delta("llm_gc_pause_seconds_count")),
            "gc_pauses_over_100ms": int(delta("llm_gc_pause_seconds_count")
                                        - delta('llm_gc_pause_seconds_bucket{le="0.1"}')),
            "gc_s": delta("llm_gc_pause_seconds_sum")}


def bench_server(run_dir: str, clients: list[int], requests: int, max_tokens: int,
                 warmup: bool = True, cache: str | None = None,
                 level_warmup: bool = True) -> tuple[list[dict], dict]:
    """Rows per concurrency level, and the start: seconds from launch to /health answering,
    and the server's warm-up line. warmup: the server's own (default) warm-up; cache: its
    --compilation_cache; level_warmup: 2 untimed requests per client at each level first."""
    import tempfile

    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        launched = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm.serve.server", f"--run_dir={run_dir}", f"--port={port}",
             f"--slots={max(clients)}", "--max_queue=4096", "--log_level=warning",
             "--model_name=bench", "--warmup=blocking" if warmup else "--no_warmup",
             *([f"--compilation_cache={cache}"] if cache else [])],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stderr=log)
        try:
            deadline = time.time() + 3600  # a cold warm-up compiles every program first
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise SystemExit(f"bench_serve: the server did not start (exit {proc.poll()}): "
                                     + log.read()[-2000:])
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            log.seek(0)
            start = {"start_s": time.perf_counter() - launched,
                     "warmup_line": next((ln.strip() for ln in log if "warm-up:" in ln), None)}
            # Untimed requests at every concurrency level first (with --no_warmup they compile the
            # buckets that level's arrival pattern meets, so no compile lands in a measured run).
            if level_warmup:
                for n in clients:
                    asyncio.run(_load(url, "bench", n, 2, max_tokens))
            rows = []
            for n in clients:
                before = _scrape(url)
                row = asyncio.run(_load(url, "bench", n, requests, max_tokens))
                rows.append({**row, **_stalls(before, _scrape(url))})
            return rows, start
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def bench_engine(run_dir: str, batches: list[int], max_tokens: int, repeats: int,
                 decode_steps: int | None = None, prefill_rows: int | None = None) -> list[dict]:
    from llm.runs import load_run
    from llm.serve.engine import BOS_ID, Engine, EngineConfig, SamplingParams
    from llm.serve.sampler import generate

    run = load_run(run_dir)
    prompt = run.tokenizer.encode("def fibonacci(n):\n")
    context = len(prompt) + max_tokens + 1
    out = []
    for batch in batches:
        extra = {} if decode_steps is None else {"decode_steps": decode_steps}
        if prefill_rows is not None:
            extra["prefill_rows"] = prefill_rows
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
        paired = [ts / te for te, ts in zip(times["engine"], times["sampler"])]
        out.append({"batch": batch, "new_tokens": max_tokens,
                    "engine_tokens_per_s": batch * max_tokens / e,
                    "sampler_tokens_per_s": batch * max_tokens / s, "engine_over_sampler": s / e,
                    "engine_over_sampler_paired_median": float(np.median(paired))})
    return out


def bench_compressed(run_dir: str, compressed: list[str], batches: list[int], new_tokens: int,
                     repeats: int) -> list[dict]:
    """Engine decode tokens/s (greedy, `new_tokens` after the same prompt, every slot busy) and
    parameter bytes of the float run and of each compressed checkpoint (`experiments.compress`
    output, loaded by the same `load_run`), timed interleaved, best of `repeats`."""
    from llm.compress.quantize import param_bytes
    from llm.runs import load_run
    from llm.serve.engine import Engine, EngineConfig, SamplingParams

    runs = {"float": load_run(run_dir)}
    for path in compressed:
        run = load_run(path)
        runs[run.compression["method"]] = run
    prompt = runs["float"].tokenizer.encode("def fibonacci(n):\n")
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    systems = {}
    for name, run in runs.items():
        for batch in batches:
            engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer, EngineConfig(
                slots=batch, max_context=max(len(prompt) + new_tokens + 1, run.seq_len)))
            systems[name, batch] = lambda e=engine, b=batch: e.generate([prompt] * b, params)
    outputs = {key: [r.output for r in fn()] for key, fn in systems.items()}  # compile
    times = {key: [] for key in systems}
    for _ in range(repeats):
        for key, fn in systems.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    rows = []
    for (name, batch), ts in times.items():
        ref, got = outputs["float", batch][0], outputs[name, batch][0]
        same = sum(a == b for a, b in zip(got, ref))
        rows.append({"weights": name, "batch": batch,
                     "param_bytes": param_bytes(runs[name].params),
                     "tokens_per_s": batch * new_tokens / min(ts),
                     "same_greedy_tokens_as_float": f"{same}/{len(ref)}"})
    return rows


def bench_peers(run_dir: str, batches: list[int], new_tokens: int, repeats: int,
                peers: list[str], threads: int | None = None) -> dict:
    """Greedy decode tokens/s at each batch size: engine, sampler and each available peer (see
    the module docstring; llama.cpp at batch 1 only, since llama-cpp-python's API decodes one
    sequence); `threads`: the peers' thread count (default: the cores). Returns
    {"rows": [...], "skipped": {peer: reason}, "prompt_tokens": n, "new_tokens": n}."""
    import tempfile

    from llm.runs import load_run
    from llm.serve.engine import BOS_ID, Engine, EngineConfig, SamplingParams
    from llm.serve.sampler import generate

    run = load_run(run_dir)
    prompt = run.tokenizer.encode("def fibonacci(n):\n")
    ids = [BOS_ID, *prompt]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    context = max(len(prompt) + new_tokens + 1, run.seq_len)
    systems = {}  # (name, batch) -> fn returning the first sequence's new tokens
    for batch in batches:
        engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer,
                        EngineConfig(slots=batch, max_context=context))
        systems["engine", batch] = (
            lambda e=engine, b=batch: e.generate([prompt] * b, params)[0].output)
        systems["sampler", batch] = lambda b=batch: generate(
            run.graphdef, run.params, run.cfg, [ids] * b, max_new_tokens=new_tokens,
            temperature=0.0, top_k=0, eos_id=-1)[0]
    skipped, closers, threads = {}, [], threads or os.cpu_count()
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    if "transformers" in peers:
        try:
            import torch
            import transformers
        except ImportError as e:
            skipped["transformers"] = f"not installed ({e}); pip install '.[interop]'"
        else:
            from llm.interop.hf import export_run

            hf_dir = os.path.join(tmp.name, "hf")
            export_run(run_dir, hf_dir)
            torch.set_num_threads(threads)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32).eval()
            name = (f"transformers {transformers.__version__} (torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads)")

            def hf_generate(batch):
                with torch.no_grad():
                    # The mask is explicit: our BOS is id 0, which is also the pad id, and
                    # generate would otherwise mask it out.
                    out = model.generate(torch.tensor([ids] * batch), do_sample=False,
                                         attention_mask=torch.ones(batch, len(ids),
                                                                   dtype=torch.long),
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         eos_token_id=None, pad_token_id=BOS_ID)
                return out[0, len(ids):].tolist()

            for batch in batches:
                systems[name, batch] = lambda b=batch: hf_generate(b)
    if "llamacpp" in peers and 1 in batches:
        from tools.export_gguf import export_gguf
        from tools.llamacpp_worker import LlamaCpp, llama_cpp_python

        python = llama_cpp_python()
        if python is None:
            skipped["llamacpp"] = ("llama-cpp-python is not importable here, from "
                                   "$LLAMA_CPP_PYTHON or /tmp/llamacpp-venv (docs/serving.md "
                                   "builds it)")
        else:
            for qtype in ("f32", "q8_0"):
                path = export_gguf(run_dir, os.path.join(tmp.name, f"model-{qtype}.gguf"), qtype)
                worker = LlamaCpp(path, python=python, threads=threads,
                                  n_ctx=len(ids) + new_tokens + 8)
                closers.append(worker.close)
                systems[f"llama.cpp {qtype.upper()} ({worker.threads} threads)", 1] = (
                    lambda w=worker: w.generate(ids, new_tokens)[0])
    in_process = {key for key in systems if not key[0].startswith("llama.cpp")}
    try:
        outputs = {key: fn() for key, fn in systems.items()}  # warm-up (compiles ours)
        times = {key: [] for key in systems}
        cpu = {key: [] for key in systems}  # this process's CPU seconds per wall second
        for _ in range(repeats):  # interleaved, best of
            for key, fn in systems.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
                cpu[key].append((time.process_time() - c0) / times[key][-1])
    finally:
        for close in closers:
            close()
        tmp.cleanup()
    rows = []
    for (name, batch) in systems:
        ref = outputs["engine", batch]
        agree = sum(a == b for a, b in zip(outputs[name, batch], ref))
        best = int(np.argmin(times[name, batch]))
        rows.append({"system": name, "batch": batch,
                     "tokens_per_s": batch * new_tokens / min(times[name, batch]),
                     "cores_used": (cpu[name, batch][best] if (name, batch) in in_process
                                    else None),
                     "same_tokens_as_engine": f"{agree}/{len(ref)}"})
    for r in rows:
        hf = next((h for h in rows if h["system"].startswith("transformers")
                   and h["batch"] == r["batch"]), None)
        r["over_transformers"] = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None
    rows.sort(key=lambda r: r["batch"])
    return {"rows": rows, "skipped": skipped, "prompt_tokens": len(ids),
            "new_tokens": new_tokens}


def pin_threads(threads: int) -> None:
    """Restrict this process (and the children it starts) to `threads` of its cores, which also
    sizes XLA:CPU's intra-op pool (single-threaded Eigen for 1). Must run before jax is
    imported; torch and llama.cpp get the count through `bench_peers`' `threads`."""
    if "jax" in sys.modules:
        raise SystemExit("bench_serve: --threads must be applied before jax is imported")
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise SystemExit(f"bench_serve: --threads={threads} exceeds the {len(cores)} cores "
                         "this process may use")
    os.sched_setaffinity(0, cores[:threads])
    # XLA:CPU sizes its intra-op pool to the schedulable cores (the affinity set above).
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()


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
    parser.add_argument("--prefill_rows", type=int, default=None,
                        help="EngineConfig.prefill_rows for the engine part (1 = one prompt per "
                             "prefill call, the behaviour before batched prefill)")
    parser.add_argument("--server_no_warmup", action="store_true",
                        help="start the server with --no_warmup (programs compile inside the "
                             "first requests that meet them)")
    parser.add_argument("--compilation_cache", default=None,
                        help="the server's --compilation_cache (an empty directory measures a "
                             "cold start; default: the server's default)")
    parser.add_argument("--no_level_warmup", action="store_true",
                        help="measure each concurrency level without the untimed requests "
                             "before it (only the server's own warm-up)")
    parser.add_argument("--skip_server", action="store_true",
                        help="only the engine vs sampler part")
    parser.add_argument("--peers", default="transformers,llamacpp",
                        help="batch-1 decode peers ('' for none): transformers, llamacpp")
    parser.add_argument("--peer_threads", type=int, default=None,
                        help="threads for transformers and llama.cpp (default: --threads, else "
                             "the cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="like for like: pin this process (and llama.cpp's worker) to this "
                             "many cores and give every system this many threads -- XLA:CPU's "
                             "intra-op pool (sized to the cores; one: Eigen single-threaded), "
                             "torch and "
                             "llama.cpp; 'cores used' (CPU seconds per wall second of each "
                             "in-process system) reads it back")
    parser.add_argument("--batch1_tokens", type=int, default=128,
                        help="new tokens per sequence in the peer comparison")
    parser.add_argument("--skip_decode", action="store_true",
                        help="leave out the decode comparison (engine, sampler, --peers)")
    parser.add_argument("--skip_engine", action="store_true",
                        help="leave out the engine vs sampler part")
    parser.add_argument("--compressed", default="",
                        help="comma-separated compressed checkpoints (experiments.compress's "
                             "compress/<method>/) whose engine decode speed and parameter bytes "
                             "are compared with the float run's")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        pin_threads(args.threads)
        args.peer_threads = args.peer_threads or args.threads
    clients = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()
    server, start = ([], {}) if args.skip_server else bench_server(
        args.run_dir, clients, args.requests, args.max_tokens, not args.server_no_warmup,
        args.compilation_cache, not args.no_level_warmup)
    engine = [] if args.skip_engine else bench_engine(
        args.run_dir, [1, args.batch], args.max_tokens, args.repeats, args.decode_steps,
        args.prefill_rows)
    compressed = [c for c in args.compressed.split(",") if c]
    quantized = bench_compressed(args.run_dir, compressed, [1, args.batch], args.batch1_tokens,
                                 args.repeats) if compressed else []
    peers = [p for p in args.peers.split(",") if p]
    batch1 = {"rows": [], "skipped": {}, "prompt_tokens": 0, "new_tokens": 0}
    if not args.skip_decode:
        batch1 = bench_peers(args.run_dir, [1, args.batch], args.batch1_tokens, args.repeats,
                             peers, args.peer_threads)
    print(f"\nload average at start: {load[0]:.1f} ({os.cpu_count()} cores)")
    if start:
        print(f"server start: {start['start_s']:.1f} s to /health; {start['warmup_line']}")
    print(f"{'clients':>8} {'tokens/s':>10} {'TTFT p50':>10} {'TTFT p99':>10} "
          f"{'ITL p50':>9} {'ITL p99':>9}  (ms)")
    for r in server:
        print(f"{r['clients']:>8} {r['tokens_per_s']:>10.1f} {r['ttft_p50_ms']:>10.1f} "
              f"{r['ttft_p99_ms']:>10.1f} {r['itl_p50_ms']:>9.1f} {r['itl_p99_ms']:>9.1f}")
    for r in server:
        print(f"{r['clients']} clients: {r['compiles']} programs compiled during the run "
              f"({r['compile_step_s']:.2f} s of steps), {r['loop_lags_over_100ms']} event-loop "
              f"stalls > 100 ms ({r['loop_lag_s']:.2f} s in all), {r['gc_pauses']} GC pauses "
              f"({r['gc_pauses_over_100ms']} > 100 ms, {r['gc_s']:.3f} s); slowest TTFT: "
              + ", ".join(f"{t * 1000:.0f} ms (sent at {at:.2f} s)"
                          for t, at, _, _ in r["slowest_ttft"][:3]))
    print(f"\n{'batch':>6} {'engine tok/s':>13} {'sampler tok/s':>14} {'engine/sampler':>15} "
          f"{'paired median':>14}")
    for r in engine:
        print(f"{r['batch']:>6} {r['engine_tokens_per_s']:>13.1f} "
              f"{r['sampler_tokens_per_s']:>14.1f} {r['engine_over_sampler']:>15.2f} "
              f"{r['engine_over_sampler_paired_median']:>14.2f}")
    print(f"\ngreedy decode, {batch1['prompt_tokens']} prompt tokens + "
          f"{batch1['new_tokens']} new, best of {args.repeats} interleaved")
    print(f"{'system':<52} {'batch':>5} {'tok/s':>8} {'vs HF':>6} {'cores used':>10} "
          f"{'same tokens':>12}")
    for r in batch1["rows"]:
        ratio = f"{r['over_transformers']:.2f}" if r["over_transformers"] else "-"
        used = f"{r['cores_used']:.2f}" if r["cores_used"] is not None else "-"
        print(f"{r['system']:<52} {r['batch']:>5} {r['tokens_per_s']:>8.1f} {ratio:>6} "
              f"{used:>10} {r['same_tokens_as_engine']:>12}")
    if quantized:
        print(f"\nengine decode, {args.batch1_tokens} new tokens, quantized weights")
        print(f"{'weights':<10} {'batch':>5} {'param MiB':>10} {'tok/s':>8} {'greedy = float':>15}")
        for r in quantized:
            print(f"{r['weights']:<10} {r['batch']:>5} {r['param_bytes'] / 2**20:>10.3f} "
                  f"{r['tokens_per_s']:>8.1f} {r['same_greedy_tokens_as_float']:>15}")
    for peer, why in batch1["skipped"].items():
        print(f"skipped {peer}: {why}")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"run_dir": args.run_dir, "load_average": load, "server": server,
                       "server_start": start,
                       "engine_vs_sampler": engine, "max_tokens": args.max_tokens,
                       "decode_vs_peers": batch1, "quantized": quantized,
                       "threads": args.threads, "affinity": sorted(os.sched_getaffinity(0)),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "load_average_end": os.getloadavg()}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
