"""Serving a compressed checkpoint: the tiny run quantized to int8 and to int4 (packed two codes
per byte), saved the way `experiments.compress` saves it, opened by the one run loader
(`llm.runs.load_run` detects compress.json) and served by the real HTTP server. References: the
evaluator's loglikelihood and the plain batch sampler, both on the same quantized params."""

from __future__ import annotations

import json
import os
import time

import httpx
import numpy as np
import pytest

from llm.compress import quantize as Q
from llm.compress.checkpoint import save_compressed
from llm.data.sources import DataError
from llm.model import transformer
from llm.runs import load_run
from llm.serve.engine import BOS_ID, Engine, EngineConfig, SamplingParams
from llm.serve.sampler import generate
from tests.serve.test_server import _free_port, _start

PAIRS = [("def f(x):\n    return", " x + 1"), ("import", " os\nimport sys"),
         ("class A:", "\n    pass")]


@pytest.fixture(scope="module")
def compressed(tiny_run, tmp_path_factory) -> dict[str, str]:
    """{method: <out>/compress/<method>} for int8 and int4 (group 32), as experiments.compress
    lays them out (the checkpoint in <method>/checkpoint)."""
    run = load_run(tiny_run)
    _, _, axes = transformer.abstract(run.cfg)
    out = tmp_path_factory.mktemp("compressed")
    dirs = {}
    for method in ("int8", "int4"):
        q = Q.quantize_params(run.params, axes, method=method, group_size=32)
        dirs[method] = str(out / "compress" / method)
        save_compressed(os.path.join(dirs[method], "checkpoint"), q, method=method,
                        source_run=tiny_run, step=run.step)
    return dirs


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_logprobs_equal_evaluator_on_quantized_params(compressed, method):
    """Loaded by load_run from <out>/compress/<method>: QArray leaves; the engine's greedy tokens
    equal the plain sampler's and its echoed logprobs the evaluator's, both on these params."""
    from llm.eval.lm import LanguageModel

    run = load_run(compressed[method])
    assert run.compression["method"] == method and run.name.endswith(f"-{method}")
    q = run.params["layer_0"]["mlp"]["wo"]["kernel"]
    assert Q.is_qarray(q) and q.method == method
    if method == "int4":
        assert q.codes.dtype == np.uint8 and q.codes.shape[0] * 2 == q.shape[0]
    engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer,
                    EngineConfig(slots=2, chunk_size=16, min_chunk=8, max_context=64))
    prompts = [run.tokenizer.encode(p) for p, _ in PAIRS]
    got = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [r.output for r in got] == generate(
        run.graphdef, run.params, run.cfg, [[BOS_ID, *p] for p in prompts], max_new_tokens=6,
        temperature=0.0, top_k=0, eos_id=-1)
    lm = LanguageModel(run, batch_size=2, progress=False)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, lm.loglikelihood(PAIRS)):
        c, t = lm.encode_pair(ctx, cont)
        [r] = engine.generate([c + t], SamplingParams(max_tokens=0, logprobs=1, echo=True))
        mine = r.prompt_logprobs[len(c):]
        assert abs(sum(e.logprob for e in mine) - ll) < 1e-5
        assert all(e.top[0][0] == e.token_id for e in mine) == greedy


def test_server_serves_compressed_checkpoint(compressed, tiny_run):
    """The server started on <out>/compress/int4 (int8 goes through the same loader and engine,
    above; one server process keeps the test short): its greedy completions equal the plain
    sampler on the quantized params, and its start line names the method and the source. Its
    default warm-up (in the background: the server answers /health at once, then reports the
    programs still pending) readies every program the engine can run, counted by hand: with 1
    slot and 16-token chunks, rows (1) x chunks (16) first-chunk prefills + rows (1) later-chunk
    prefills + 7 kv buckets (16 ... 96, 128 = 64 context + 16 chunk rounded up to 128) decodes,
    each with and without logprobs: 2 x (1 + 1 + 7) = 18. Requests that meet every kind of call
    (a burst, a prompt longer than a chunk with echo + logprobs, a stream with logprobs) then
    compile nothing."""
    method = "int4"
    run = load_run(compressed[method])
    port = _free_port()
    proc = _start(compressed[method], port, "--slots=1", "--chunk_size=16", "--log_level=info")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.5)
        while (pending := httpx.get(f"{url}/health", timeout=5).json()["warmup_pending"]) > 0:
            assert time.time() < deadline, f"background warm-up stuck at {pending} programs"
            time.sleep(0.5)
        prompts = [p for p, _ in PAIRS]
        got = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": [run.tokenizer.encode(p) for p in prompts],
            "max_tokens": 10, "temperature": 0, "ignore_eos": True}).json()
        ids = [[BOS_ID, *run.tokenizer.encode(p)] for p in prompts]
        ref = generate(run.graphdef, run.params, run.cfg, ids, max_new_tokens=10,
                       temperature=0.0, top_k=0, eos_id=-1)
        texts = [c["text"] for c in sorted(got["choices"], key=lambda c: c["index"])]
        assert texts == [run.tokenizer.decode(r) for r in ref]
        assert all(c["finish_reason"] == "length" for c in got["choices"])
        long = list(range(3, 43))  # 41 tokens with BOS: a first chunk and two later chunks
        scored = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": long, "max_tokens": 4, "echo": True, "logprobs": 2,
            "temperature": 0.7, "top_p": 0.9, "seed": 3}).json()
        assert len(scored["choices"][0]["logprobs"]["token_logprobs"]) == 40 + 4
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": "x", "max_tokens": 20, "logprobs": 1,
                "stream": True, "ignore_eos": True}) as r:
            assert "data: [DONE]" in list(r.iter_lines())
        compiled = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                    if line.startswith("llm_engine_compiled_programs ")]
        assert compiled == ["llm_engine_compiled_programs 18.0"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    assert f"{method} weights from {tiny_run}" in err
    assert "warm-up: 18 programs queued" in err, err


def test_bad_or_mismatched_compressed_checkpoint_is_one_line(compressed, tmp_path):
    """A record whose source run is gone, and one whose stored shapes are not the source
    model's: DataError from the loader, and one line + exit 2 from the server CLI."""
    src = os.path.join(compressed["int8"], "checkpoint")
    with open(os.path.join(src, "compress.json")) as f:
        record = json.load(f)

    def variant(name: str, **change) -> str:
        d = tmp_path / name
        d.mkdir()
        os.symlink(os.path.join(src, "params"), d / "params")
        (d / "compress.json").write_text(json.dumps({**record, **change}))
        return str(d)

    gone = variant("gone", source_run=str(tmp_path / "missing_run"))
    quantized = dict(record["quantized"])
    quantized["layer_0/mlp/wo/kernel"] = {**quantized["layer_0/mlp/wo/kernel"],
                                          "shape": [256, 64]}
    shape = variant("shape", quantized=quantized)
    with pytest.raises(DataError, match="source run cannot be read"):
        load_run(gone)
    with pytest.raises(DataError, match="does not match the model of its source run"):
        load_run(shape)
    with pytest.raises(DataError, match="compressed from step"):
        load_run(src, step=record["step"] + 1)
    proc = _start(shape, _free_port())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1
    assert "layer_0/mlp/wo/kernel" in err
