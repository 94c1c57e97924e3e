"""tools/bench_train.py runs end to end on a shrunken config and reports real numbers (a
two-point sequence sweep, one thread read back); with LLM_TORCH_PYTHON (an interpreter that has
torch) the PyTorch twins, eager and compiled, run too."""

import json
import os

import pytest

from tests.conftest import run_experiment
from tools.bench_train import parse_args, points, strip_point_args

SMALL = ["--gin_param=ModelConfig.d_model=64", "--gin_param=ModelConfig.num_layers=1",
         "--gin_param=ModelConfig.vocab_size=256", "--gin_param=ModelConfig.max_seq_len=32",
         "--seqs=8,16", "--tokens=32", "--steps=2", "--warmup=1", "--round=1", "--threads=1"]


def _run(tmp_path, configs, *extra):
    out = tmp_path / "bench.json"
    proc = run_experiment("tools.bench_train", [f"--configs={configs}", *SMALL,
                                                f"--json={out}", *extra], timeout=600)
    return proc.stdout, json.loads(out.read_text())


def test_bench_train_sweeps_and_reads_back_threads(tmp_path):
    stdout, report = _run(tmp_path, "gpt2_tiny")
    results = report["results"]
    assert [(r["config"], r["seq"], r["batch"]) for r in results] == [
        ("gpt2_tiny", 8, 4), ("gpt2_tiny", 16, 2)]
    for r in results:
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["cpu_ms"] > 0
        assert 0 < r["mfu"] < 1.5 and r["matmul_gflops"] > 0
        assert r["tokens_per_s"] == pytest.approx(32 / (r["step_ms"] / 1e3))
        assert r["loss_last"] < r["loss_first"]  # the steps really train
        assert r["twins"] == [] and "twin skipped" in r["twin_note"]
        # --threads=1: the process was pinned to one core and XLA's pool has one thread.
        assert r["usable_cpus"] == 1 and r["xla_threads"] == 1
        assert r["peak_rss_mb"] > 100 and r["xla_temp_mb"] > 0
    with open("/proc/cpuinfo") as f:
        assert report["machine"]["cpu_model"] in f.read()
    assert "ours/compiled" in stdout and "machine:" in stdout


def test_point_selection():
    args = parse_args(["--configs=a,b", "--seqs=256,1024", "--tokens=4096"])
    assert points(args) == [("a", 16, 256), ("a", 4, 1024), ("b", 16, 256), ("b", 4, 1024)]
    with pytest.raises(SystemExit, match="--tokens=1000 is not a multiple of seq 256"):
        points(parse_args(["--seqs=256", "--tokens=1000"]))
    assert strip_point_args(["--configs", "x", "--seq=8", "--steps=2", "--json", "o.json",
                             "--threads=1"]) == ["--steps=2", "--threads=1"]


@pytest.mark.skipif(not os.environ.get("LLM_TORCH_PYTHON"),
                    reason="set LLM_TORCH_PYTHON to a python with torch to run the twins")
def test_torch_twins_match_param_count_and_threads(tmp_path):
    _, report = _run(tmp_path, "gpt2_tiny", f"--torch_python={os.environ['LLM_TORCH_PYTHON']}")
    for r in report["results"]:
        assert [t["name"] for t in r["twins"]] == ["eager", "compiled"]
        for t in r["twins"]:
            assert t["params"] == r["params"] and t["ratio"] > 0
            assert t["threads"] == 1 and t["peak_rss_mb"] > 0
        assert r["twins"][1]["first_step_s"] > 0


def test_no_attention_removes_only_the_mixing_across_positions(monkeypatch):
    """--no_attention (attention -> q + k + v on both sides): a position's logits no longer
    depend on earlier tokens, while the real model's do."""
    import jax
    import numpy as np

    from llm.model import attention, transformer
    from tools.bench_train import load_config, swap_out_attention

    cfg = load_config("gpt2_tiny", ["ModelConfig.d_model=32", "ModelConfig.num_layers=1",
                                    "ModelConfig.vocab_size=64", "ModelConfig.max_seq_len=8"])
    graphdef, params = transformer.init(cfg, jax.random.key(0))
    a = np.arange(8, dtype=np.int32)[None] % 64
    b = a.copy()
    b[0, 0] = 63  # only the first token differs

    def last_logits(tokens):
        return np.asarray(transformer.apply(graphdef, params, tokens)[0, -1])

    assert np.abs(last_logits(a) - last_logits(b)).max() > 1e-4
    monkeypatch.setattr(attention, "attend", attention.attend)  # restored after the test
    swap_out_attention(cfg)
    np.testing.assert_array_equal(last_logits(a), last_logits(b))


def test_attention_alone_variants_agree_and_report(tmp_path):
    """tools/bench_blocked_attention.py: every XLA formulation computes the same attention (to
    fp32 rounding, against mha_reference) and each row has its timings; with LLM_TORCH_PYTHON the
    SDPA rows come from a torch process with the same thread count."""
    from tools.bench_blocked_attention import main

    torch_python = os.environ.get("LLM_TORCH_PYTHON")
    argv = ["--seqs=32", "--tokens=64", "--heads=2", "--head_dim=8", "--iters=1",
            "--impls=blocked:8x8,blocked_causal:16x8,jax_xla",
            f"--json={tmp_path / 'a.json'}"] + ([f"--torch_python={torch_python}"]
                                                if torch_python else [])
    points = main(argv)
    assert [(p["seq"], p["batch"]) for p in points] == [(32, 2)]
    assert json.loads((tmp_path / "a.json").read_text())["points"][0]["seq"] == 32
    for p in points:
        jax_rows = [r for r in p["rows"].values() if r["side"] == "jax"]
        assert len(jax_rows) == 3
        for r in jax_rows:
            assert r["max_abs_diff"] < 1e-5 and r["fwd_ms"] > 0 and r["grad_ms"] > 0
            assert r["temp_mib"] >= 0
        if torch_python:
            assert p["torch_threads"] == p["xla_threads"]
            assert p["rows"]["sdpa_compiled"]["grad_vs_sdpa_compiled"] == 1.0
