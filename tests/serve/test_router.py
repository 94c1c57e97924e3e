"""The hybrid router on loopback: a local engine (the tiny run, in-process) and a "remote" that is
a second real server over another checkpoint of the same run, behind real HTTP; the remote
records every body it receives, so the privacy rule is checked on what actually left."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from llm.runs import load_run
from llm.serve.engine import Engine, EngineConfig
from llm.serve.router import create_router_app
from llm.serve.server import create_app

EMAIL = "jane.roe@example.org"


def _engine(run) -> Engine:
    return Engine(run.graphdef, run.params, run.cfg, run.tokenizer,
                  EngineConfig(slots=4, chunk_size=32, min_chunk=16, max_context=run.seq_len))


def _serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def _recording(app, received: list):
    """ASGI wrapper: records (path, JSON body) of every HTTP request, then serves it."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        messages, body = [], b""
        while True:
            m = await receive()
            messages.append(m)
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        received.append((scope["path"], json.loads(body) if body else None))
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        return await app(scope, replay, send)
    return wrapped


@pytest.fixture(scope="module")
def stack(tiny_run):
    local_engine = _engine(load_run(tiny_run))
    local_app = create_app(local_engine, model_name="small")
    received: list = []
    remote_url, remote, remote_thread = _serve(_recording(
        create_app(_engine(load_run(tiny_run, step=6)), model_name="big"), received))
    # Compile the remote's programs before any router waits on it.
    httpx.post(f"{remote_url}/v1/completions", timeout=600, json={
        "model": "big", "prompt": "x", "max_tokens": 9, "temperature": 0})
    received.clear()
    # A port nobody listens on: the remote is down.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"
    routers = {}
    for name, threshold, url in (("never", -1e9, remote_url), ("always", 1.0, remote_url),
                                 ("down", 1.0, dead_url)):
        local = httpx.AsyncClient(transport=httpx.ASGITransport(app=local_app),
                                  base_url="http://local", timeout=120)
        app = create_router_app(local, local_model="small", remote_url=url, remote_model="big",
                                threshold=threshold, model_name="router", remote_timeout=300,
                                on_start=local_engine.start if name == "never" else None)
        routers[name] = _serve(app)
    yield {name: r[0] for name, r in routers.items()}, received, remote_url
    for _, server, thread in [*routers.values(), (None, remote, remote_thread)]:
        server.should_exit = True
        thread.join(timeout=60)
    local_engine.stop()


def _complete(url: str, prompt: str, **kw) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "router", "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_threshold_decides_and_confidence_is_mean_logprob(stack):
    urls, received, remote_url = stack
    received.clear()
    local = _complete(urls["never"], "def parse(", logprobs=1)
    assert local["routing"]["answered_by"] == "local"
    assert local["routing"]["reason"] == "confident" and received == []
    lps = local["choices"][0]["logprobs"]["token_logprobs"]
    assert local["routing"]["confidence"] == pytest.approx(sum(lps) / len(lps), abs=1e-6)
    assert local["routing"]["signal"] == "mean_logprob"
    # The other signals, on the same response, against their definitions.
    from llm.serve.router import confidence

    assert confidence("completion", local, "min_logprob") == min(lps)
    assert confidence("completion", local, "sum_logprob") == pytest.approx(sum(lps))
    assert confidence("completion", local, "sqrt_norm_logprob") == pytest.approx(
        sum(lps) / len(lps) ** 0.5)
    assert local["model"] == "router"

    far = _complete(urls["always"], "def parse(")
    assert far["routing"]["answered_by"] == "remote"
    assert far["routing"]["reason"] == "low_confidence"
    assert far["choices"][0]["logprobs"] is None  # not asked for
    assert [(p, b["model"], b["prompt"]) for p, b in received] == [
        ("/v1/completions", "big", "def parse(")]
    # The remote's answer is what the remote server gives for this request.
    direct = httpx.post(f"{remote_url}/v1/completions", timeout=120, json={
        "model": "big", "prompt": "def parse(", "max_tokens": 8, "temperature": 0}).json()
    assert direct["choices"][0]["text"] == far["choices"][0]["text"]


def test_pii_prompt_stays_local_and_is_logged_without_the_pii(stack, caplog):
    urls, received, _ = stack
    received.clear()
    with caplog.at_level(logging.INFO, logger="llm.serve.router"):
        out = httpx.post(f"{urls['always']}/v1/chat/completions", timeout=120, json={
            "model": "router", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": f"write to {EMAIL} about the bug"}]}).json()
    assert out["routing"]["answered_by"] == "local" and out["routing"]["reason"] == "pii"
    assert received == []  # nothing reached the remote
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "EMAIL x1" in logged and EMAIL not in logged and "jane" not in logged
    metrics = httpx.get(f"{urls['always']}/metrics", timeout=30).text
    assert "llm_router_pii_prompts_total 1.0" in metrics


def test_remote_down_falls_back_locally_and_says_so(stack):
    urls, _, _ = stack
    out = _complete(urls["down"], "import os")
    assert out["routing"] == {**out["routing"], "answered_by": "local", "fallback": True,
                              "reason": "low_confidence"}
    assert out["choices"][0]["text"] == _complete(urls["never"], "import os")["choices"][0][
        "text"]
    metrics = httpx.get(f"{urls['down']}/metrics", timeout=30).text
    assert "llm_router_remote_fallbacks_total 1.0" in metrics


def test_openai_client_streams_through_the_router_and_bad_input(stack):
    import openai

    urls, _, _ = stack
    client = openai.OpenAI(base_url=f"{urls['always']}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="router", prompt="class A:", max_tokens=8,
                                      temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="router", prompt="class A:", max_tokens=8, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # the local server's validation, passed on
        client.completions.create(model="router", prompt="x", max_tokens=-1)
    r = httpx.post(f"{urls['always']}/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_router_confidence_auroc_by_hand():
    """tools/router_confidence.auroc against the Mann-Whitney count done by hand."""
    import numpy as np

    from tools.router_confidence import auroc

    labels = np.array([False, False, True, True])
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4 pairs
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), labels) == 0.75
    assert auroc(np.array([0.5, 0.5, 0.5, 0.9]), labels) == 0.75  # a tie counts half: 1+2 / 4
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), labels) == 0.0
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([True, True])))
