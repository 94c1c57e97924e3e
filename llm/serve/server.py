"""An OpenAI-compatible HTTP server over the continuous-batching engine.

    python -m llm.serve.server --run_dir=runs/quickstart --port=8000

Endpoints: POST /v1/completions and /v1/chat/completions (both with SSE streaming), GET /v1/models,
/health and /metrics (Prometheus), and vLLM's POST /tokenize, /detokenize and GET /tokenizer_info,
which lm-eval's `local-completions` uses to tokenize like the server (tokenizer_backend=remote).

FastAPI on uvicorn: the OpenAPI spec comes from the request models (schemathesis fuzzes it), and
SSE is a plain StreamingResponse. The engine runs in its own thread; each request waits on an
asyncio queue fed from the engine thread by `call_soon_threadsafe`.

API keys (`--api_keys_file`, one per line, or LLM_API_KEYS=k1,k2): every /v1 and tokenizer route
then needs `Authorization: Bearer <key>` (401 otherwise). Without keys the server binds 127.0.0.1
only. Errors are OpenAI error objects ({"error": {"message", "type", "param", "code"}}), never a
traceback. SIGTERM stops accepting connections and lets in-flight requests finish (uvicorn's
graceful shutdown) before the engine stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm.serve.chat_template import CHAT_STOP, CHAT_TEMPLATE_JINJA, render_chat
from llm.serve.engine import QueueFull, SamplingParams
from llm.serve.metrics import ServerMetrics

log = logging.getLogger("llm.serve")

LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Stop = str | list[str] | None


class StreamOptions(_Body):
    """OpenAI's stream_options: include_usage adds a last chunk with the usage and no choices
    (every other chunk then carries "usage": null)."""

    include_usage: bool | None = False


class _Sampling(_Body):
    """Sampling fields shared by both generation routes (OpenAI's, plus vLLM's top_k, min_p,
    stop_token_ids and ignore_eos)."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = -1
    min_p: Annotated[float, Field(ge=0, le=1)] | None = 0.0
    n: Annotated[int, Field(ge=1)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Accepted by OpenAI, not implemented here: refused with a 400 naming the field rather than
    # silently ignored (a client asking for a tool call or JSON must not get plain text).
    suffix: str | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None


class CompletionRequest(_Sampling):
    """/v1/completions (OpenAI legacy completions). prompt: a string, a list of strings, a list of
    token ids, or a list of those; each prompt is one choice."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    best_of: int | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    """/v1/chat/completions. The messages are rendered with `llm.serve.chat_template`."""

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool | None = False


class DetokenizeRequest(_Body):
    tokens: list[int]


# ---------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _validation_message(errors: list) -> tuple[str, str | None]:
    """FastAPI's validation errors -> (one readable line, the first offending field)."""
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        if e.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
            param = None
            continue
        else:
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body", param


# ---------------------------------------------------------------------------- the app

def create_app(engine, *, model_name: str, api_keys: frozenset[str] = frozenset()):
    """The FastAPI app serving `engine` (an `llm.serve.engine.Engine`, started and stopped by the
    app's lifespan) as model `model_name`."""
    metrics = ServerMetrics(engine)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        task = asyncio.create_task(metrics.sample_forever())
        try:
            yield
        finally:
            task.cancel()
            engine.stop()
            metrics.close()

    app = FastAPI(title="llm OpenAI-compatible server", version="1", lifespan=lifespan)
    app.state.engine = engine
    generate_openapi = app.openapi

    def openapi() -> dict:
        """The generated spec, with the served model as the documented value of `model` (any
        other name is answered 404)."""
        if not app.openapi_schema:
            schemas = generate_openapi()["components"]["schemas"]
            for body in ("CompletionRequest", "ChatRequest"):
                schemas[body]["properties"]["model"]["enum"] = [model_name]
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path if request.url.path in metrics.routes
                                else "other", str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if not api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in api_keys:
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    auth = [Depends(authorize)]

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def sampling(body, max_tokens: int, logprobs: int | None, echo: bool,
                 extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        if (body.n or 1) != 1:
            raise APIError(400, f"n={body.n} is not supported; send n=1 (or several requests)",
                           param="n")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(body, field):
                raise APIError(400, f"{field} is not supported; leave it at 0", param=field)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if getattr(body, "best_of", None) not in (None, 1):
            raise APIError(400, "best_of is not supported; leave it at 1", param="best_of")
        for field in ("suffix", "tools", "functions", "tool_choice", "function_call"):
            if getattr(body, field) not in (None, "none"):
                raise APIError(400, f"{field} is not supported by this server (no tool calling "
                               "or insertion); leave it out", param=field)
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {body.response_format.get('type')!r} is not "
                           "supported (only 'text'); leave it out", param="response_format")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream=true",
                           param="stream_options")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens, temperature=float(body.temperature if body.temperature
                                                     is not None else 1.0),
            top_k=max(0, body.top_k or 0), top_p=float(body.top_p or 1.0),
            min_p=float(body.min_p or 0.0), seed=body.seed,
            stop=tuple(s for s in (*stop, *extra_stop) if s),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos),
            logprobs=logprobs, echo=echo)
        try:
            params.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return params

    def submit_all(prompts: list[list[int]], params: SamplingParams):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(req, kind):  # in the engine thread
            metrics.on_event(req, kind)
            loop.call_soon_threadsafe(queue.put_nowait, (req, kind))

        reqs = []
        try:
            for p in prompts:
                reqs.append(engine.submit(p, params, on_event))
        except QueueFull as e:
            for r in reqs:
                engine.cancel(r)
            raise APIError(429, f"the server is busy: {e}; retry later",
                           type="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            for r in reqs:
                engine.cancel(r)
            param = "max_tokens" if "max_tokens" in str(e) else "prompt"
            raise APIError(400, str(e), param=param) from None
        metrics.on_submit(reqs)
        return reqs, queue

    async def wait_all(request: Request, reqs, queue: asyncio.Queue) -> None:
        """Until every request finished; cancels them if the client goes away."""
        try:
            while not all(r.finished for r in reqs):
                try:
                    await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
        finally:
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)

    def encode_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [tokenizer.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], str):
            return [tokenizer.encode(p) for p in prompt]
        return [list(p) for p in prompt]

    def completion_logprobs(req, echo: bool) -> dict:
        entries = (req.prompt_logprobs if echo else []) + req.logprobs
        tokens, offsets, pos = [], [], 0
        for e in entries:
            text = engine.token_text(e.token_id)
            tokens.append(text)
            offsets.append(pos)
            pos += len(text)
        top = []
        for e in entries:
            if e.logprob is None:
                top.append(None)
                continue
            d = {engine.token_text(t): lp for t, lp in e.top}
            d.setdefault(engine.token_text(e.token_id), e.logprob)
            top.append(d)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": top, "text_offset": offsets}

    def usage(reqs) -> dict:
        p = sum(len(r.prompt) for r in reqs)
        c = sum(len(r.output) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def finish_reason(req) -> str:
        return "length" if req.finish_reason == "length" else "stop"

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream_error() -> str:
        """What a stream ends with when the engine failed on its request (as vLLM does: an
        error object in place of the next chunk, then [DONE])."""
        error = APIError(500, "the engine failed on this request", type="server_error")
        return sse(error.body()) + "data: [DONE]\n\n"

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "slots": len(engine.slots),
                "active_slots": engine.active_slots(), "queue_depth": engine.queue_depth(),
                "warmup_pending": engine.warm_pending()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "llm",
            "max_model_len": engine.max_context}]}

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        return {"eos_token": tokenizer.id_to_piece(engine.eos_id), "bos_token": None,
                "pad_token": tokenizer.id_to_piece(0), "chat_template": CHAT_TEMPLATE_JINJA,
                "model_max_length": engine.max_context, "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        ids = tokenizer.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_context}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})",
                           param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = encode_prompts(body.prompt)
        echo = bool(body.echo)
        params = sampling(body, body.max_tokens if body.max_tokens is not None else 16,
                          body.logprobs, echo)
        reqs, queue = submit_all(prompts, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(i, req, text, logprobs, reason):
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

        if body.stream:
            with_usage = include_usage(body)

            def chunk(c) -> str:
                obj = {"id": rid, "object": "text_completion", "created": now,
                       "model": model_name, "choices": [c]}
                return sse({**obj, "usage": None} if with_usage else obj)

            async def events() -> AsyncIterator[str]:
                sent = [0] * len(reqs)
                nlog = [0] * len(reqs)
                try:
                    if echo:
                        for i, r in enumerate(reqs):
                            yield chunk(choice(i, r, tokenizer.decode(r.prompt), None, None))
                    remaining = len(reqs)
                    while remaining:
                        req, kind = await queue.get()
                        if req.finish_reason == "error":
                            yield stream_error()
                            return
                        remaining -= kind == "finished"
                        i = reqs.index(req)
                        delta = req.text[sent[i]:req.emitted]
                        sent[i] = req.emitted
                        lp = None
                        if params.logprobs is not None:
                            if echo and nlog[i] == 0 and req.prompt_logprobs:
                                full = completion_logprobs(req, True)
                                cut = len(req.prompt_logprobs)
                                lp = {k: v[:cut] for k, v in full.items()}
                                yield chunk(choice(i, req, "", lp, None))
                            full = completion_logprobs(req, False)
                            lp = {k: v[nlog[i]:] for k, v in full.items()}
                            nlog[i] = len(req.logprobs)
                        reason = finish_reason(req) if kind == "finished" else None
                        if delta or reason or lp:
                            yield chunk(choice(i, req, delta, lp, reason))
                    if with_usage:
                        yield sse({"id": rid, "object": "text_completion", "created": now,
                                   "model": model_name, "choices": [], "usage": usage(reqs)})
                    yield "data: [DONE]\n\n"
                finally:
                    for r in reqs:
                        if not r.finished:
                            engine.cancel(r)

            return StreamingResponse(events(), media_type="text/event-stream")

        await wait_all(request, reqs, queue)
        choices = []
        for i, r in enumerate(reqs):
            text = (tokenizer.decode(r.prompt) if echo else "") + r.text
            lp = completion_logprobs(r, echo) if params.logprobs is not None else None
            choices.append(choice(i, r, text, lp, finish_reason(r)))
        if any(r.finish_reason == "error" for r in reqs):
            raise APIError(500, "the engine failed on this request", type="server_error")
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": choices, "usage": usage(reqs)}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        prompt = tokenizer.encode(render_chat([m.model_dump() for m in body.messages]))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, engine.max_context - len(prompt))
        top = body.top_logprobs if body.top_logprobs is not None else 0
        params = sampling(body, max_tokens, top if body.logprobs else None, False, CHAT_STOP)
        reqs, queue = submit_all([prompt], params)
        req = reqs[0]
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chat_logprobs(entries) -> dict:
            return {"content": [{
                "token": engine.token_text(e.token_id), "logprob": e.logprob,
                "bytes": list(engine.token_text(e.token_id).encode()),
                "top_logprobs": [{"token": engine.token_text(t), "logprob": lp,
                                  "bytes": list(engine.token_text(t).encode())}
                                 for t, lp in e.top]} for e in entries]}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                sent = nlog = 0
                base = {"id": rid, "object": "chat.completion.chunk", "created": now,
                        "model": model_name}
                if include_usage(body):
                    base["usage"] = None
                try:
                    yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                          "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                    while True:
                        r, kind = await queue.get()
                        if r.finish_reason == "error":
                            yield stream_error()
                            return
                        delta = r.text[sent:r.emitted]
                        sent = r.emitted
                        lp = None
                        if params.logprobs is not None and len(r.logprobs) > nlog:
                            lp = chat_logprobs(r.logprobs[nlog:])
                            nlog = len(r.logprobs)
                        reason = finish_reason(r) if kind == "finished" else None
                        if delta or reason or lp:
                            yield sse({**base, "choices": [{
                                "index": 0, "delta": {"content": delta} if delta else {},
                                "logprobs": lp, "finish_reason": reason}]})
                        if kind == "finished":
                            break
                    if include_usage(body):
                        yield sse({**base, "choices": [], "usage": usage(reqs)})
                    yield "data: [DONE]\n\n"
                finally:
                    if not req.finished:
                        engine.cancel(req)

            return StreamingResponse(events(), media_type="text/event-stream")

        await wait_all(request, reqs, queue)
        if req.finish_reason == "error":
            raise APIError(500, "the engine failed on this request", type="server_error")
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text},
                             "logprobs": chat_logprobs(req.logprobs)
                             if params.logprobs is not None else None,
                             "finish_reason": finish_reason(req)}],
                "usage": usage(reqs)}

    return app


# ---------------------------------------------------------------------------- command line

def read_api_keys(path: str | None) -> frozenset[str]:
    """Keys from `path` (one per line, # comments) and LLM_API_KEYS (comma-separated)."""
    keys = {k.strip() for k in os.environ.get("LLM_API_KEYS", "").split(",") if k.strip()}
    if path:
        try:
            with open(path) as f:
                keys |= {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
        except OSError as e:
            raise ValueError(f"--api_keys_file={path!r} cannot be read ({e.strerror}).") from None
        if not keys:
            raise ValueError(f"--api_keys_file={path!r} holds no key; put one key per line.")
    return frozenset(keys)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or ValueError naming the port when it is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--port={port} on {host} cannot be used ({e.strerror}); choose a free "
                         "port or stop the process that holds it.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.serve.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True,
                        help="a training run directory, or a compressed checkpoint "
                             "(experiments.compress's compress/<method>/, detected by its "
                             "compress.json)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default=None,
                        help="bind address; default 0.0.0.0 with API keys, 127.0.0.1 without")
    parser.add_argument("--api_keys_file", default=None, help="one API key per line")
    parser.add_argument("--model_name", default=None, help="served model id (default: run name)")
    parser.add_argument("--slots", type=int, default=8, help="concurrent decode slots")
    parser.add_argument("--max_queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument("--chunk_size", type=int, default=256, help="prefill chunk (power of 2)")
    parser.add_argument("--decode_steps", type=int, default=8,
                        help="tokens per decode call (streamed in bursts of this many)")
    parser.add_argument("--max_context", type=int, default=None,
                        help="prompt + completion tokens (default: the run's training seq_len)")
    parser.add_argument("--kv_cache_dtype", default="model", choices=("model", "int8"),
                        help="KV cache storage: the model's compute dtype, or int8 with one scale "
                             "per position and head (3.8x less memory than fp32 at head_dim 64)")
    parser.add_argument("--mesh", default=None,
                        help="a mesh gin file, as training uses (gin_configs/mesh/*.gin: its "
                             "make_mesh and axis_rules bindings); default one device")
    parser.add_argument("--warmup", nargs="?", const="blocking", default="background",
                        choices=("background", "blocking", "off"),
                        help="ready every program the engine can run -- each prefill and decode "
                             "bucket, with and without logprobs -- 'background' (default): "
                             "listen at once and compile them in the engine thread whenever no "
                             "request is running; 'blocking' (or a bare --warmup): before "
                             "listening, so no request ever waits on a compile; 'off': each "
                             "program compiles inside the first request that meets it")
    parser.add_argument("--no_warmup", dest="warmup", action="store_const", const="off",
                        help="the same as --warmup=off")
    parser.add_argument("--compilation_cache", default=None,
                        help="directory of JAX's persistent compilation cache, so programs are "
                             "compiled once per machine and loaded from disk on later starts "
                             "(default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/llm/xla); "
                             "'none' turns it off")
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    prog = "llm.serve.server"
    try:
        keys = read_api_keys(args.api_keys_file)
        host = args.host or ("0.0.0.0" if keys else LOOPBACK)
        if not keys and host not in (LOOPBACK, "localhost"):
            raise ValueError(f"--host={host} needs API keys (--api_keys_file or LLM_API_KEYS); "
                             "without keys the server listens on 127.0.0.1 only.")
        sock = bind_socket(host, args.port)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    from llm.config import ConfigError
    from llm.data.sources import DataError
    from llm.runs import load_run
    from llm.serve.engine import (
        Engine,
        EngineConfig,
        compilation_cache_stats,
        configure_compilation_cache,
        default_compilation_cache,
    )

    cache_dir = args.compilation_cache or default_compilation_cache()
    try:
        configure_compilation_cache(None if cache_dir == "none" else cache_dir)
    except OSError as e:
        if args.compilation_cache:  # the user's own directory: an error
            print(f"{prog}: error: --compilation_cache={cache_dir!r} cannot be created "
                  f"({e.strerror}); pass a writable directory or 'none'.", file=sys.stderr)
            sock.close()
            return 2
        print(f"{prog}: warning: the default compilation cache {cache_dir!r} cannot be created "
              f"({e.strerror}); running without one (--compilation_cache=DIR sets another).",
              file=sys.stderr)
        cache_dir = "none"
        configure_compilation_cache(None)

    try:
        mesh = rules = None
        if args.mesh:
            from llm.config import parse_gin
            from llm.parallel.mesh import make_mesh
            from llm.parallel.rules import axis_rules

            parse_gin([args.mesh], skip_unknown=True)
            try:
                mesh, rules = make_mesh(), axis_rules()
            except ConfigError as e:  # gin appends "In call to configurable ..." lines
                raise ConfigError(f"--mesh={args.mesh}: {str(e).splitlines()[0]}") from None
        run = load_run(args.run_dir, step=args.step, mesh=mesh, rules=rules)
        max_context = args.max_context or run.seq_len
        engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer, mesh=mesh, rules=rules,
                        config=EngineConfig(
            slots=args.slots, max_queue=args.max_queue, chunk_size=args.chunk_size,
            min_chunk=min(16, args.chunk_size), max_context=max_context,
            decode_steps=args.decode_steps, kv_cache_dtype=args.kv_cache_dtype))
    except (ConfigError, DataError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sock.close()
        return 2

    if args.warmup == "background":
        queued = engine.warm_in_background()
        print(f"{prog}: warm-up: {queued} programs queued for the engine thread, compiled (or "
              "loaded from the compilation cache) while no request runs; /health shows progress",
              file=sys.stderr, flush=True)
    elif args.warmup == "blocking":
        start, hits = time.perf_counter(), dict(compilation_cache_stats)
        programs = engine.warmup(progress=sys.stderr.isatty())
        loaded = compilation_cache_stats["hits"] - hits["hits"]
        cache = (f"{loaded} loaded from the compilation cache {cache_dir}, "
                 f"{programs - loaded} compiled" if cache_dir != "none" else
                 "compiled; no compilation cache")
        print(f"{prog}: warm-up: {programs} of {engine.max_compiled_shapes()} programs ready "
              f"({cache}) in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    import uvicorn

    name = args.model_name or run.name
    app = create_app(engine, model_name=name, api_keys=keys)
    auth = (f"API keys required ({len(keys)} configured)" if keys else
            "no API keys configured: listening on 127.0.0.1 only")
    where = "one device" if mesh is None else f"mesh {dict(mesh.shape)}"
    if run.compression is not None:
        from llm.compress.quantize import param_bytes

        where += (f", {run.compression['method']} weights from {run.compression['source_run']}, "
                  f"{param_bytes(run.params) / 2**20:.2f} MiB of params")
    print(f"{prog}: serving {name} (step {run.step}, context {engine.max_context}, "
          f"{args.slots} slots, {where}) on http://{host}:{args.port} -- {auth}", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level=args.log_level.lower(), timeout_keep_alive=30)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler that
    # was installed before it: make that one a no-op so a drained shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run(sockets=[sock])
    print(f"{prog}: stopped after draining in-flight requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
