"""The hybrid router's quality/latency trade-off over a sweep of thresholds, against an all-local
and an all-remote policy, on held-out next-line completions.

    python -m tools.bench_router --local_run=runs/quickstart \\
        --remote_run=runs/compress/larger --out=runs/router_bench [--prompts=96]

The remote is a real second server (`python -m llm.serve.server` over `--remote_run`, a
subprocess on a loopback port), standing in for the bigger cloud model; the local model runs
in-process behind the router (`llm.serve.router.create_router_app`, reached through httpx's ASGI
transport), exactly as `python -m llm.serve.router --run_dir` runs it.

Task (held out, built here, frozen before any threshold is chosen): `--prompts` lines from the
first Python files of the embedded corpus that the data split put in *validation* (the quickstart
never trained on them); in each, two code lines of >= 12 characters picked by a seeded RNG. The
prompt is the <= 400 characters before that line (ending at its line break), the reference is
the line; prompts are then trimmed from the front (whole lines) to fit the smaller of the two
models' contexts (`/v1/models` max_model_len) with the answer. Completions are greedy, at
most 24 tokens, stopped at a newline. Quality: exact match of the line (whitespace-stripped)
and the fraction of the reference's characters matched before the first difference (prefix
accuracy, the smoother of the two).

Thresholds: the 20, 40, 60 and 80 % quantiles of the local answers' confidences (mean token
logprob, measured in a first all-local pass), so the router defers about 20-80 % of the prompts;
all-local is threshold -1e9 (never defers), all-remote asks the remote directly. Latency: mean
wall time per request, sent one at a time. Writes results.json and tradeoff.png under --out.
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


def held_out_prompts(data_dir: str, n: int, seed: int = 0,
                     per_file: int = 2, with_source: bool = False) -> list[tuple]:
    """(prompt, reference line) pairs from validation-split stdlib files (see module doc),
    `per_file` lines from each file; with_source: (prompt, line, document id) triples."""
    from llm.data.sources import embedded_corpus, split_of

    with open(os.path.join(data_dir, "dataset.json")) as f:
        fraction = json.load(f)["settings"]["validation_fraction"]
    rng = np.random.default_rng(seed)
    out = []
    for doc in embedded_corpus(include_docs=False):
        if split_of(doc.id, fraction) != "validation":
            continue
        lines = doc.text.split("\n")
        starts = np.cumsum([0] + [len(x) + 1 for x in lines])
        picks = [i for i, x in enumerate(lines) if i > 3 and len(x.strip()) >= 12]
        if not picks:
            continue
        for i in sorted(rng.choice(picks, size=min(per_file, len(picks)), replace=False)):
            out.append((doc.text[max(0, starts[i] - 400):starts[i]], lines[i],
                        *([doc.id] if with_source else [])))
            if len(out) == n:
                return out
    return out


def fit_prompt(prompt: str, tokenizer, max_tokens: int) -> str:
    """`prompt` without as many leading lines (then characters) as it takes to be at most
    `max_tokens` tokens."""
    while len(tokenizer.encode(prompt)) > max_tokens:
        cut = prompt.find("\n")
        prompt = prompt[cut + 1:] if 0 <= cut < len(prompt) - 1 else prompt[8:]
    return prompt


def score(completion: str, reference: str) -> tuple[float, float]:
    """(exact match, prefix accuracy) of a completion against the reference line."""
    got, want = completion.split("\n")[0], reference
    same = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got),
                                                                                len(want)))
    return float(got.strip() == want.strip()), same / max(1, len(want))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_run", required=True)
    parser.add_argument("--local_step", type=int, default=None)
    parser.add_argument("--remote_run", required=True)
    parser.add_argument("--remote_step", type=int, default=None)
    parser.add_argument("--data_dir", default=None,
                        help="prepared data of the runs (default: the local run's manifest)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import httpx
    from tqdm import tqdm

    from llm.runs import load_run
    from llm.serve.engine import Engine, EngineConfig
    from llm.serve.router import create_router_app
    from llm.serve.server import create_app

    os.makedirs(args.out, exist_ok=True)
    load = os.getloadavg()
    run = load_run(args.local_run, step=args.local_step)
    data_dir = args.data_dir
    if data_dir is None:
        with open(os.path.join(args.local_run, "manifest.json")) as f:
            data_dir = json.load(f)["data"]["data_dir"]
    tasks = held_out_prompts(data_dir, args.prompts)
    port = _free_port()
    remote_url = f"http://127.0.0.1:{port}"
    step = [] if args.remote_step is None else [f"--step={args.remote_step}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm.serve.server", f"--run_dir={args.remote_run}", *step,
         f"--port={port}", "--model_name=remote", "--slots=4", "--log_level=warning",
         "--warmup=blocking"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer,
                    EngineConfig(slots=4, max_context=run.seq_len, chunk_size=256))
    engine.start()
    local_app = create_app(engine, model_name="local")
    body = {"max_tokens": 24, "temperature": 0, "stop": ["\n"]}

    async def ask(client, url_path: str, model: str, prompt: str) -> tuple[dict, float]:
        t0 = time.perf_counter()
        r = await client.post(url_path, json={**body, "model": model, "prompt": prompt})
        r.raise_for_status()
        return r.json(), time.perf_counter() - t0

    async def policy(threshold: float | None) -> list[dict]:
        """One pass over the prompts: through a router at `threshold`, or (None) all-remote."""
        if threshold is None:
            client, model = httpx.AsyncClient(base_url=remote_url, timeout=600), "remote"
        else:
            local = httpx.AsyncClient(transport=httpx.ASGITransport(app=local_app),
                                      base_url="http://local", timeout=600)
            app = create_router_app(local, local_model="local", remote_url=remote_url,
                                    remote_model="remote", threshold=threshold,
                                    model_name="router", remote_timeout=600)
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                       base_url="http://router", timeout=600)
            model = "router"
        rows = []
        async with client:
            for prompt, ref in tqdm(tasks, desc=f"threshold {threshold}", leave=False):
                out, seconds = await ask(client, "/v1/completions", model, prompt)
                em, prefix = score(out["choices"][0]["text"], ref)
                routing = out.get("routing", {"answered_by": "remote", "confidence": None})
                rows.append({"exact": em, "prefix": prefix, "seconds": seconds,
                             "deferred": routing["answered_by"] == "remote",
                             "confidence": routing["confidence"]})
        return rows

    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"bench_router: the remote server did not start ({proc.poll()})")
            try:
                if httpx.get(f"{remote_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        # Both models must see the same prompt: trim each from the front (whole lines) until
        # it and the answer fit the smaller context (BOS + prompt + max_tokens).
        remote_ctx = httpx.get(f"{remote_url}/v1/models").json()["data"][0]["max_model_len"]
        context = min(remote_ctx, engine.max_context)
        tasks = [(fit_prompt(prompt, run.tokenizer, context - 2 - body["max_tokens"]), ref)
                 for prompt, ref in tasks]
        # Warm-up passes over every prompt (discarded): compile the remote's and the local
        # engine's programs for every prompt length, so no pass below pays a compile.
        asyncio.run(policy(None))
        asyncio.run(policy(-1e9))
        local_rows = asyncio.run(policy(-1e9))  # never defers
        confs = np.array([r["confidence"] for r in local_rows])
        thresholds = [float(np.quantile(confs, q)) + 1e-9 for q in (0.2, 0.4, 0.6, 0.8)]
        results = [{"policy": "all-local", "threshold": None, "rows": local_rows}]
        for t in thresholds:
            results.append({"policy": f"router t={t:.3f}", "threshold": t,
                            "rows": asyncio.run(policy(t))})
        results.append({"policy": "all-remote", "threshold": None,
                        "rows": asyncio.run(policy(None))})
    finally:
        engine.stop()
        proc.terminate()
        proc.wait(timeout=120)
    load_end = os.getloadavg()
    summary = []
    for r in results:
        rows = r["rows"]
        summary.append({"policy": r["policy"], "threshold": r["threshold"],
                        "deferred": float(np.mean([x["deferred"] for x in rows])),
                        "exact_match": float(np.mean([x["exact"] for x in rows])),
                        "prefix_accuracy": float(np.mean([x["prefix"] for x in rows])),
                        "prefix_accuracy_se": float(np.std([x["prefix"] for x in rows], ddof=1)
                                                    / np.sqrt(len(rows))),
                        "mean_latency_s": float(np.mean([x["seconds"] for x in rows]))})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"local": f"{args.local_run} step {run.step}",
                   "remote": f"{args.remote_run} step {args.remote_step or 'latest'}",
                   "prompts": len(tasks), "context": context, "load_average": load,
                   "load_average_end": load_end,
                   "summary": summary,
                   "results": results}, f, indent=1)
    print(f"\n{len(tasks)} held-out next-line prompts; load average {load[0]:.1f} at start, "
          f"{load_end[0]:.1f} at the end")
    print(f"{'policy':<20} {'deferred':>9} {'exact':>7} {'prefix acc':>11} {'latency s':>10}")
    for s in summary:
        print(f"{s['policy']:<20} {s['deferred']:>9.2f} {s['exact_match']:>7.3f} "
              f"{s['prefix_accuracy']:>7.3f}±{s['prefix_accuracy_se']:.3f} "
              f"{s['mean_latency_s']:>10.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    routed = [s for s in summary if s["policy"].startswith("router")]
    ax.plot([s["mean_latency_s"] for s in routed], [s["prefix_accuracy"] for s in routed], "o-",
            label="router (threshold sweep)")
    for s in routed:
        ax.annotate(f"{s['deferred']:.0%} deferred", (s["mean_latency_s"], s["prefix_accuracy"]),
                    fontsize=7, xytext=(4, -10), textcoords="offset points")
    for s, marker in ((summary[0], "s"), (summary[-1], "^")):
        ax.plot(s["mean_latency_s"], s["prefix_accuracy"], marker, markersize=9,
                label=s["policy"])
    ax.set_xlabel("mean latency per request (s)")
    ax.set_ylabel("next-line prefix accuracy")
    ax.set_title(f"hybrid router, {len(tasks)} held-out prompts (load {load[0]:.0f}-"
                 f"{load_end[0]:.0f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "tradeoff.png"), dpi=120)
    print(f"wrote {args.out}/results.json and tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
