"""The engine on an 8-device FSDP x tensor-parallel mesh (fake CPU devices, in a subprocess)
gives the single-device greedy tokens and logprobs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_experiment


@pytest.mark.slow
def test_fsdp_tp_mesh_matches_one_device(tiny_run):
    proc = run_experiment("tests.serve.sharding_worker", [tiny_run], env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    single, sharded = out["single"], out["fsdp_tp"]
    assert "fsdp" in sharded["sharding"] or "tensor" in sharded["sharding"]
    assert sharded["tokens"] == single["tokens"]
    for a, b in zip(sharded["logprobs"], single["logprobs"]):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_server_mesh_flag(tiny_run, tmp_path):
    """`--mesh=gin_configs/mesh/fsdp_tp.gin` serves on 8 fake devices (1 x 4 x 2) and answers
    with the single-device engine's greedy tokens; a mesh the devices cannot form is one line,
    exit 2."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from llm.runs import load_run
    from llm.serve.engine import Engine, EngineConfig, SamplingParams
    from tests.conftest import COMPILE_CACHE, REPO
    from tests.serve.test_server import _free_port

    env = {**os.environ, **COMPILE_CACHE, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

    def start(mesh: str, port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "llm.serve.server", f"--run_dir={tiny_run}",
             f"--port={port}", "--model_name=m", "--slots=2", "--chunk_size=16",
             "--log_level=warning", "--no_warmup", f"--mesh={mesh}"], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    bad = tmp_path / "bad.gin"
    bad.write_text("make_mesh.data = 1\nmake_mesh.fsdp = 1\nmake_mesh.tensor = 3\n")
    proc = start(str(bad), _free_port())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "tensor=3" in err

    port = _free_port()
    proc = start("gin_configs/mesh/fsdp_tp.gin", port)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        got = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300, json={
            "model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in err
    run = load_run(tiny_run)
    [req] = Engine(run.graphdef, run.params, run.cfg, run.tokenizer, EngineConfig(
        slots=2, chunk_size=16, min_chunk=16, max_context=run.seq_len)).generate(
        [[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                       logprobs=0))
    np.testing.assert_allclose(got, [e.logprob for e in req.logprobs], atol=1e-5)
