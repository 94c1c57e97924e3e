"""The HTTP server through real clients on loopback: the official `openai` package, lm-eval's
`local-completions`, 64 concurrent streaming clients, schemathesis, and bad input. One server
process (the tiny run, 8 slots, an API key) serves the whole module; the last test SIGTERMs it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from llm.runs import load_run
from tests.conftest import COMPILE_CACHE, REPO

KEY = "test-key-123"
NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: str, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **COMPILE_CACHE, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "llm.serve.server", f"--run_dir={run_dir}", f"--port={port}",
         f"--model_name={NAME}", "--log_level=warning", *extra],
        cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def server(tiny_run):
    port = _free_port()
    proc = _start(tiny_run, port, "--slots=8", "--max_queue=64", "--chunk_size=32",
                  "--no_warmup", env={"LLM_API_KEYS": KEY})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("server did not come up in 240 s")
    # Compile every prefill bucket and the decode step once.
    for n in (3, 20, 40):
        httpx.post(f"{url}/v1/completions", headers=_auth(), timeout=120, json={
            "model": NAME, "prompt": list(range(5, 5 + n)), "max_tokens": 2})
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def test_openai_client_completions_chat_and_streaming(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]

    done = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=8,
                                     temperature=0, logprobs=2, echo=True)
    choice = done.choices[0]
    assert choice.text.startswith("def f(x):") and choice.finish_reason in ("length", "stop")
    n_prompt = done.usage.prompt_tokens
    assert len(choice.logprobs.token_logprobs) == n_prompt + done.usage.completion_tokens
    assert all(max(top.values()) >= lp - 1e-6 for top, lp in
               zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs))

    scored = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=0,
                                       logprobs=1, echo=True)
    assert scored.choices[0].text == "def f(x):" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs[:n_prompt]

    plain = client.completions.create(model=NAME, prompt="import os\n", max_tokens=12,
                                      temperature=0)
    stream = client.completions.create(model=NAME, prompt="import os\n", max_tokens=12,
                                       temperature=0, stream=True)
    chunks = list(stream)
    # OpenAI's stream format: every chunk has a choice; usage only on request, as a last chunk
    # without choices, every other chunk then carrying usage null.
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == plain.choices[0].text and len(pieces) > 1
    counted = list(client.completions.create(model=NAME, prompt="import os\n", max_tokens=12,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 12
    assert counted[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None and len(c.choices) == 1 for c in counted[:-1])

    chat = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0, seed=1,
                                          messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.role == "assistant"
    text = chat.choices[0].message.content
    chunks = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0, seed=1,
                                            messages=[{"role": "user", "content": "hello"}],
                                            stream=True)
    chunks = list(chunks)
    assert all(len(c.choices) == 1 for c in chunks) and chunks[0].choices[0].delta.role == \
        "assistant" and chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == text

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_bad_input_is_4xx_with_a_message(server):
    url, _ = server
    post = lambda body, **kw: httpx.post(f"{url}/v1/completions", timeout=30,  # noqa: E731
                                         headers=kw.get("headers", _auth()), **(
                                             {"content": body} if isinstance(body, str)
                                             else {"json": body}))
    cases = [
        (post({"model": NAME, "prompt": "x"}, headers={}), 401),
        (post('{"model": "tiny", "prompt": '), 400),
        (post({"model": NAME, "prompt": 5}), 400),
        (post({"model": NAME, "prompt": "x", "max_tokens": -1}), 400),
        (post({"model": NAME, "prompt": "x", "max_tokens": "many"}), 400),
        (post({"model": "gpt-4", "prompt": "x"}), 404),
        (post({"model": NAME, "prompt": "x", "n": 2}), 400),
        (post({"model": NAME, "prompt": "x", "max_tokens": 1000}), 400),
        (post({"model": NAME, "prompt": [99999]}), 400),
        (post({"model": NAME, "prompt": []}), 400),
        (post({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}), 400),
        (post({"model": NAME, "prompt": "x", "suffix": "y"}), 400),
        (httpx.post(f"{url}/v1/chat/completions", timeout=30, headers=_auth(), json={
            "model": NAME, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}), 400),
        (httpx.post(f"{url}/v1/chat/completions", timeout=30, headers=_auth(), json={
            "model": NAME, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in response.text
    assert "exceeds the context" in cases[7][0].json()["error"]["message"]
    assert [c[0].json()["error"]["param"] for c in cases[-4:]] == [
        "stream_options", "suffix", "tools", "response_format"]


def test_queue_limit_answers_429(server):
    """100 simultaneous requests against 8 slots and a queue of 64: some are refused with 429,
    the rest complete; nothing else."""
    url, _ = server

    async def main():
        async with httpx.AsyncClient(timeout=120, headers=_auth()) as client:
            return await asyncio.gather(*[client.post(f"{url}/v1/completions", json={
                "model": NAME, "prompt": "def", "max_tokens": 40, "ignore_eos": True})
                for _ in range(100)])

    statuses = [r.status_code for r in asyncio.run(main())]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 8
    assert _health(url)["active_slots"] == 0


def test_64_concurrent_streaming_clients(server):
    """64 clients stream 2 completions each at once: every stream ends with a finish reason and
    [DONE], text matches its usage count, 0 errors, and afterwards no slot is held."""
    url, _ = server

    async def one(client, i):
        out = []
        for k in range(2):
            text, finish, usage, done = "", None, None, False
            async with client.stream("POST", f"{url}/v1/completions", json={
                    "model": NAME, "prompt": f"# client {i}\n", "max_tokens": 16 + i % 8,
                    "temperature": 0.8, "seed": i * 10 + k, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk["choices"]:
                        text += c["text"]
                        finish = c["finish_reason"] or finish
                    usage = chunk.get("usage") or usage
            out.append((done, finish, usage["completion_tokens"], 16 + i % 8))
        return out

    async def main():
        async with httpx.AsyncClient(timeout=300, headers=_auth()) as client:
            return await asyncio.gather(*[one(client, i) for i in range(64)])

    t0 = time.time()
    results = [x for per in asyncio.run(main()) for x in per]
    elapsed = time.time() - t0
    assert len(results) == 128
    assert all(done and finish == "length" and n == want for done, finish, n, want in results)
    health = _health(url)
    assert health["active_slots"] == 0 and health["queue_depth"] == 0
    metrics = httpx.get(f"{url}/metrics").text
    assert 'llm_http_requests_total{route="/v1/completions",status="500"}' not in metrics
    print(f"64 clients x 2 streams: {elapsed:.1f} s")


def test_client_disconnect_frees_its_slot(server):
    url, _ = server

    def cancelled() -> float:
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith('llm_engine_requests_finished_total{reason="cancelled"}'):
                return float(line.split()[-1])
        return 0.0

    before = cancelled()
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, headers=_auth(), json={
            "model": NAME, "prompt": "x", "max_tokens": 62, "ignore_eos": True,
            "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.time() + 20
    while time.time() < deadline and (_health(url)["active_slots"] or cancelled() == before):
        time.sleep(0.1)
    assert _health(url)["active_slots"] == 0 and cancelled() == before + 1


@pytest.mark.slow
def test_lm_eval_local_completions_matches_direct_evaluation(server, tiny_run, tmp_path,
                                                             monkeypatch):
    """A hand-made multiple-choice task through lm-eval: `local-completions` against the server
    gives the same accuracy and per-choice loglikelihoods (1e-4) as lm-eval on the run directory
    through `LanguageModel`."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from llm.eval.lm import LanguageModel

    url, _ = server
    docs = [
        {"question": "import", "choices": [" os", " the", " 12"], "answer": 0},
        {"question": "def __init__(self", "choices": [", x):", " cat", "!!"], "answer": 0},
        {"question": "return", "choices": [" None", " dog", " ]]"], "answer": 0},
        {"question": "class Message", "choices": [":", " blue", " 7"], "answer": 0},
        {"question": "from email import", "choices": [" utils", " seven", " ;;"], "answer": 0},
        {"question": "if x is", "choices": [" None:", " green", " ++"], "answer": 1},
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "serve_mc.yaml").write_text(
        "task: serve_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tasks = TaskManager(include_path=str(tmp_path))

    class Direct(LM):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def loglikelihood(self, requests):
            return self.lm.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests):
            return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests):
            return self.lm.generate_until([r.args for r in requests])

    def evaluate(model, model_args=None):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["serve_mc"],
                                      task_manager=tasks, log_samples=True)
        samples = sorted(out["samples"]["serve_mc"], key=lambda s: s["doc_id"])
        return (out["results"]["serve_mc"]["acc,none"],
                [[r[0] for r in s["filtered_resps"]] for s in samples])

    direct_acc, direct_ll = evaluate(Direct(LanguageModel.from_run_dir(tiny_run,
                                                                        progress=False)))
    served_acc, served_ll = evaluate(
        "local-completions",
        f"base_url={url}/v1/completions,model={NAME},tokenizer_backend=remote,"
        f"auth_token={KEY},num_concurrent=2,max_retries=1,max_length=63")
    assert served_acc == direct_acc
    for a, b in zip(served_ll, direct_ll):
        assert len(a) == 3 and max(abs(float(x) - float(y)) for x, y in zip(a, b)) < 1e-4


def test_schemathesis_fuzz_finds_no_server_error(server, tmp_path):
    """Bounded fuzzing of every operation in /openapi.json (valid and invalid bodies): no 5xx."""
    url, proc = server
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    res = subprocess.run(
        [exe, "--no-color", "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
         "-n", "25", "-H", f"Authorization: Bearer {KEY}", "--seed", "0",
         "--request-timeout", "60", "--mode", "all"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert proc.poll() is None
    assert _health(url)["active_slots"] == 0


def test_sigterm_drains_in_flight_streams(server):
    """SIGTERM while a stream is running: the stream still completes ([DONE], all tokens), then
    the server exits 0. Runs last: it stops the module's server."""
    url, proc = server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, headers=_auth(), json={
            "model": NAME, "prompt": "x", "max_tokens": 60, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        lines = r.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest
    usage = [json.loads(x[6:]) for x in rest if x.startswith("data: {")][-1]["usage"]
    assert usage["completion_tokens"] == 60
    assert proc.wait(timeout=60) == 0


def test_engine_failure_is_an_error_object_in_streams_and_replies(tiny_run):
    """An engine step that fails (the prefill raises, injected) fails its requests: a stream
    ends with an OpenAI error object then [DONE], a plain request is a 500 error object, and the
    server keeps answering. In-process app, no compile."""
    from llm.serve.engine import Engine, EngineConfig
    from llm.serve.server import create_app
    from tests.serve.test_router import _serve

    class Broken:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("injected failure")

        def _cache_size(self) -> int:
            return 0

    run = load_run(tiny_run)
    engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer,
                    EngineConfig(slots=2, chunk_size=16, max_context=run.seq_len))
    engine._prefill_fn = Broken()
    url, server, thread = _serve(create_app(engine, model_name=NAME))
    try:
        for route, body in (("completions", {"prompt": "x"}), ("chat/completions", {
                "messages": [{"role": "user", "content": "hi"}]})):
            with httpx.stream("POST", f"{url}/v1/{route}", timeout=60, json={
                    "model": NAME, "max_tokens": 4, "stream": True, **body}) as r:
                lines = [x for x in r.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            error = json.loads(lines[-2][6:])["error"]
            assert error["type"] == "server_error" and "engine failed" in error["message"]
            plain = httpx.post(f"{url}/v1/{route}", timeout=60, json={
                "model": NAME, "max_tokens": 4, **body})
            assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
            assert "Traceback" not in plain.text
        assert httpx.get(f"{url}/health", timeout=10).json()["active_slots"] == 0
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def test_startup_errors_are_one_line(tiny_run, tmp_path):
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    for f in ("manifest.json", "config.gin"):
        shutil.copy(os.path.join(tiny_run, f), empty / f)
    proc = _start(str(empty), _free_port())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no checkpoint" in err and len(err.strip().splitlines()) == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = _start(tiny_run, s.getsockname()[1])
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--port" in err and len(err.strip().splitlines()) == 1

    proc = _start(tiny_run, _free_port(), "--host=0.0.0.0", env={"LLM_API_KEYS": ""})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "127.0.0.1 only" in err
