"""A hybrid local/cloud router with the OpenAI API: a small local model answers, and the router
defers to a bigger model behind an OpenAI-compatible endpoint when the local answer looks unsure.

    python -m llm.serve.router --run_dir=runs/small --remote_url=http://host:8000 \\
        --remote_model=big --threshold=-1.5 --port=8100

Clients talk to it exactly as to `llm.serve.server` (POST /v1/completions and
/v1/chat/completions, streaming or not; GET /v1/models, /health, /metrics); each response also
carries a `routing` object saying who answered and why.

Per request:
  1. Privacy: the prompt text (completion prompts, chat message contents) goes through the
     curation PII detector (`llm.data.curate.pii.find`). A prompt with personal data is answered
     locally and never sent to the remote, whatever the confidence; the log line names only the
     kinds and counts of PII found, never the text.
  2. The local model answers (greedy or sampled as asked), with its token logprobs.
  3. Confidence = the mean logprob of the generated tokens, (1/T) sum_t log p(token_t), which is
     -log(perplexity of the answer). Chosen over the summed logprob because it is length-
     normalised (a sum defers every long answer), and over the entropy because it needs nothing
     but the probabilities of the tokens actually produced (the engine returns exactly these,
     the evaluator's numbers; an entropy needs the whole distribution, of which the API returns
     the top 20) and it also sees a sampled unlikely token. With several prompts in one request
     the least confident one decides.
  4. Confidence >= threshold: the local answer is returned. Otherwise the original request goes
     to the remote model; if the remote cannot be reached (connection error, timeout, 5xx), the
     local answer is returned with `routing.fallback = true`, and
     `llm_router_remote_fallbacks_total` counts it.
Scoring requests (echo, max_tokens=0) and token-id prompts are always local: their logprobs or
ids mean nothing to a model with another tokenizer.

Streaming: the router must see the whole local answer before it can judge it, so a streamed
request is answered as an SSE stream of the chosen answer once the decision is made.
The local model runs in-process (`llm.serve.server.create_app` over an engine, reached through
httpx's ASGI transport) or behind `--local_url`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from llm.data.curate.pii import find as find_pii

log = logging.getLogger("llm.serve.router")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def prompt_text(route: str, body: dict) -> str | None:
    """The text the PII rule inspects: completion prompt strings, or every chat message's
    content; None for token-id prompts (no text to inspect)."""
    if route == "chat":
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p.get("text", "") for p in content if isinstance(p, dict)]
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return None


# Confidence signals over the generated tokens' logprobs [T] (higher = more confident).
# tools/router_confidence.py measures how well each predicts answer quality (docs/serving.md).
SIGNALS = {
    "mean_logprob": lambda lp: sum(lp) / len(lp),
    "sum_logprob": sum,
    "min_logprob": min,
    "first_logprob": lambda lp: lp[0],
    "sqrt_norm_logprob": lambda lp: sum(lp) / math.sqrt(len(lp)),
}


def confidence(route: str, response: dict, signal_name: str = "mean_logprob") -> float:
    """The `signal_name` (a SIGNALS name; default the mean generated-token logprob) of the least
    confident choice (0.0 when nothing was generated: an empty answer has nothing to defer)."""
    worst = 0.0
    for choice in response.get("choices", []):
        lp = choice.get("logprobs") or {}
        if route == "chat":
            values = [e["logprob"] for e in lp.get("content") or []]
        else:
            values = [x for x in lp.get("token_logprobs") or [] if x is not None]
        if values:
            worst = min(worst, SIGNALS[signal_name](values))
    return worst


class RouterMetrics:
    """Prometheus counters of the router (`/metrics`)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.decisions = Counter("llm_router_requests", "requests by who answered and why",
                                 ["answered_by", "reason"], registry=r)
        self.fallbacks = Counter("llm_router_remote_fallbacks",
                                 "deferred requests answered locally because the remote failed",
                                 registry=r)
        self.pii = Counter("llm_router_pii_prompts", "prompts kept local for personal data",
                           registry=r)
        self.latency = Histogram("llm_router_request_latency_seconds",
                                 "request latency by who answered", ["answered_by"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram("llm_router_local_confidence",
                                    "mean token logprob of local answers",
                                    buckets=(-8, -6, -4, -3, -2, -1.5, -1, -0.5, -0.25, 0),
                                    registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": None}}, status_code=status)


def create_router_app(local: httpx.AsyncClient, *, local_model: str, remote_url: str,
                      remote_model: str, threshold: float, model_name: str = "router",
                      remote_api_key: str | None = None, remote_timeout: float = 60.0,
                      signal_name: str = "mean_logprob", on_start=None,
                      on_stop=None) -> FastAPI:
    """The router app. local: a client whose base URL serves the local model (OpenAI API) under
    the name `local_model`; the remote at `remote_url` serves `remote_model`. threshold: the
    value of the confidence `signal_name` (SIGNALS; default the mean token logprob) below which an
    answer is deferred (finite; -1e9 never defers, anything above 0 always does)."""
    if signal_name not in SIGNALS:
        raise ValueError(f"signal_name={signal_name!r} is not one of {', '.join(SIGNALS)}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold={threshold} must be finite (a mean token logprob; a very "
                         "low one, e.g. -1e9, never defers)")
    metrics = RouterMetrics()
    headers = {"Authorization": f"Bearer {remote_api_key}"} if remote_api_key else {}
    remote = httpx.AsyncClient(base_url=remote_url.rstrip("/"), timeout=remote_timeout,
                               headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_start:
            on_start()
        try:
            yield
        finally:
            await remote.aclose()
            if on_stop:
                on_stop()

    app = FastAPI(title="llm hybrid router (OpenAI-compatible)", version="1", lifespan=lifespan)
    app.state.metrics = metrics

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "threshold": threshold}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "llm"}]}

    async def route(kind: str, request: Request):
        start = time.perf_counter()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if body.get("model") != model_name:
            return _error(404, f"model {body.get('model')!r} does not exist; this router serves "
                          f"{model_name!r} (GET /v1/models)", "not_found_error")
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        stream = bool(body.get("stream"))
        text = prompt_text(kind, body)
        pii = find_pii(text) if text else []
        scoring = kind == "completion" and (body.get("echo") or body.get("max_tokens") == 0)
        # 1. The local answer, with the logprobs the confidence needs.
        plain = {k: v for k, v in body.items() if k != "stream_options"}  # asked non-streamed
        local_body = {**plain, "model": local_model, "stream": False}
        if kind == "chat":
            local_body["logprobs"] = True
        elif local_body.get("logprobs") is None:
            local_body["logprobs"] = 0
        reply = await local.post(path, json=local_body)
        if reply.status_code != 200:  # the local server's 4xx (bad input) goes back as it is
            return JSONResponse(reply.json(), status_code=reply.status_code)
        answer = reply.json()
        conf = confidence(kind, answer, signal_name)
        asked = body.get("logprobs") if kind == "chat" else body.get("logprobs") is not None
        if not asked:  # logprobs were requested for the confidence only
            for c in answer["choices"]:
                c["logprobs"] = None
        routing = {"answered_by": "local", "confidence": conf, "signal": signal_name,
                   "threshold": threshold,
                   "reason": "confident", "fallback": False}
        # 2. Decide.
        if pii:
            counts: dict[str, int] = {}
            for _, _, name in pii:
                counts[name] = counts.get(name, 0) + 1
            log.info("router: prompt with personal data (%s) answered locally",
                     ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
            metrics.pii.inc()
            routing["reason"] = "pii"
        elif text is None or scoring:
            routing["reason"] = "token_ids" if text is None else "scoring"
        elif conf < threshold:
            routing["reason"] = "low_confidence"
            try:
                far = await remote.post(path, json={**plain, "model": remote_model,
                                                    "stream": False})
                if far.status_code >= 500:
                    raise httpx.HTTPStatusError("remote 5xx", request=far.request, response=far)
                if far.status_code != 200:
                    return JSONResponse(far.json(), status_code=far.status_code)
                answer = far.json()
                routing["answered_by"] = "remote"
            except (httpx.HTTPError, ValueError) as e:
                log.warning("router: remote %s unavailable (%s); answering locally", remote_url,
                            type(e).__name__)
                metrics.fallbacks.inc()
                routing["fallback"] = True
        metrics.confidence.observe(max(conf, -8.0))
        metrics.decisions.labels(routing["answered_by"], routing["reason"]).inc()
        metrics.latency.labels(routing["answered_by"]).observe(time.perf_counter() - start)
        answer["model"] = model_name
        answer["routing"] = routing
        if stream:
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_as_sse(kind, answer, usage),
                                     media_type="text/event-stream")
        return answer

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await route("completion", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await route("chat", request)

    return app


async def _as_sse(kind: str, answer: dict, include_usage: bool = False) -> AsyncIterator[str]:
    """A finished answer as OpenAI SSE chunks: the text of each choice, then its finish reason,
    then (with stream_options.include_usage) the usage, and [DONE]; the routing object rides on
    the first chunk."""
    base = {"id": answer.get("id", "router"), "created": answer.get("created", 0),
            "model": answer["model"]}
    first = True
    for c in answer["choices"]:
        i = c.get("index", 0)
        if kind == "chat":
            chunks = [{"index": i, "delta": {"role": "assistant",
                                             "content": c["message"].get("content") or ""},
                       "logprobs": c.get("logprobs"), "finish_reason": None},
                      {"index": i, "delta": {}, "logprobs": None,
                       "finish_reason": c.get("finish_reason")}]
            obj = "chat.completion.chunk"
        else:
            chunks = [{"index": i, "text": c["text"], "logprobs": c.get("logprobs"),
                       "finish_reason": None},
                      {"index": i, "text": "", "logprobs": None,
                       "finish_reason": c.get("finish_reason")}]
            obj = "text_completion"
        for ch in chunks:
            extra = {"routing": answer["routing"]} if first else {}
            first = False
            yield f"data: {json.dumps({**base, 'object': obj, 'choices': [ch], **extra})}\n\n"
    if include_usage and answer.get("usage"):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        tail = {**base, "object": obj, "choices": [], "usage": answer["usage"]}
        yield f"data: {json.dumps(tail)}\n\n"
    yield "data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.serve.router",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", default=None, help="the local model's run directory")
    parser.add_argument("--local_url", default=None,
                        help="instead of --run_dir: an OpenAI server with the local model")
    parser.add_argument("--local_model", default=None,
                        help="the local model's name at --local_url (default: its first model)")
    parser.add_argument("--remote_url", required=True, help="OpenAI-compatible base URL")
    parser.add_argument("--remote_model", required=True)
    parser.add_argument("--remote_api_key_env", default="LLM_REMOTE_API_KEY",
                        help="environment variable holding the remote's API key (if any)")
    parser.add_argument("--threshold", type=float, required=True,
                        help="defer when the local answer's mean token logprob is below this")
    parser.add_argument("--confidence", default="mean_logprob",
                        help=f"the confidence signal: {' | '.join(SIGNALS)}")
    parser.add_argument("--remote_timeout", type=float, default=60.0)
    parser.add_argument("--model_name", default="router", help="the model id clients send")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    prog = "llm.serve.router"
    import os

    from llm.serve.server import LOOPBACK, bind_socket

    try:
        if (args.run_dir is None) == (args.local_url is None):
            raise ValueError("give exactly one of --run_dir (local model in-process) and "
                             "--local_url (a running server)")
        if args.confidence not in SIGNALS:
            raise ValueError(f"--confidence={args.confidence!r} is not one of "
                             f"{', '.join(SIGNALS)}")
        if not math.isfinite(args.threshold):
            raise ValueError(f"--threshold={args.threshold} must be a finite number (a mean "
                             "token logprob, e.g. -1.5)")
        sock = bind_socket(LOOPBACK, args.port)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    on_start = on_stop = None
    if args.run_dir:
        from llm.config import ConfigError
        from llm.data.sources import DataError
        from llm.runs import load_run
        from llm.serve.engine import Engine, EngineConfig
        from llm.serve.server import create_app

        try:
            run = load_run(args.run_dir)
            engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer,
                            EngineConfig(slots=args.slots, max_context=run.seq_len,
                                         min_chunk=16))
        except (ConfigError, DataError, ValueError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sock.close()
            return 2
        local_model = "local"
        local = httpx.AsyncClient(transport=httpx.ASGITransport(
            app=create_app(engine, model_name=local_model)), base_url="http://local",
            timeout=None)
        on_start, on_stop = engine.start, engine.stop
    else:
        local = httpx.AsyncClient(base_url=args.local_url.rstrip("/"), timeout=None)
        local_model = args.local_model or httpx.get(
            f"{args.local_url.rstrip('/')}/v1/models").json()["data"][0]["id"]
    app = create_router_app(local, local_model=local_model, remote_url=args.remote_url,
                            remote_model=args.remote_model, threshold=args.threshold,
                            model_name=args.model_name,
                            remote_api_key=os.environ.get(args.remote_api_key_env),
                            remote_timeout=args.remote_timeout,
                            signal_name=args.confidence,
                            on_start=on_start,
                            on_stop=on_stop)
    import uvicorn

    print(f"{prog}: routing {args.model_name} on http://{LOOPBACK}:{args.port}: local "
          f"{args.run_dir or args.local_url}, remote {args.remote_url} ({args.remote_model}), "
          f"defer below {args.confidence} {args.threshold}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower())).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
