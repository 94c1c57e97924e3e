"""tools/bench_train.py runs end to end on a shrunken config and reports real numbers; with
LLM_TORCH_PYTHON (an interpreter that has torch) the PyTorch twin runs too."""

import json
import os

import pytest

from tests.conftest import run_experiment

SMALL = ["--gin_param=ModelConfig.d_model=64", "--gin_param=ModelConfig.num_layers=1",
         "--gin_param=ModelConfig.vocab_size=256", "--gin_param=ModelConfig.max_seq_len=32",
         "--batch=2", "--seq=16", "--steps=2", "--warmup=1", "--round=1"]


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = run_experiment("tools.bench_train", ["--configs=gpt2_tiny,llama_tiny", *SMALL,
                                                f"--json={out}", *extra], timeout=300)
    return proc.stdout, json.loads(out.read_text())["results"]


def test_bench_train_reports_every_config(tmp_path):
    stdout, results = _run(tmp_path)
    assert [r["config"] for r in results] == ["gpt2_tiny", "llama_tiny"]
    for r in results:
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["cpu_ms"] > 0
        assert 0 < r["mfu"] < 1.5 and r["matmul_gflops"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1e3))
        assert r["loss_last"] < r["loss_first"]  # the steps really train
        assert r["ratio"] is None and "twin skipped" in r["twin_note"]
    assert "ours/twin" in stdout


@pytest.mark.skipif(not os.environ.get("LLM_TORCH_PYTHON"),
                    reason="set LLM_TORCH_PYTHON to a python with torch to run the twin")
def test_torch_twin_matches_param_count(tmp_path):
    _, results = _run(tmp_path, f"--torch_python={os.environ['LLM_TORCH_PYTHON']}")
    gpt2, llama = results
    assert gpt2["twin_params"] == gpt2["params"] and gpt2["ratio"] > 0
    assert llama["ratio"] is None and "GPT-2-style" in llama["twin_note"]
