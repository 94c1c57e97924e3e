"""tools/bench_attention.py: the CPU correctness path runs and its numbers are real."""

from __future__ import annotations

import json

from tools import bench_attention


def test_cpu_check_compares_implementations(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_attention.main(["--cpu-check", "--impls", "ours,cudnn", "--modes", "fwd+bwd",
                               "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert len(ours) == 2 and all(r["max_err"] < 1e-4 and r["error"] is None for r in ours)
    # cuDNN cannot run on CPU: reported as an error row, not silently dropped.
    assert all(r["error"] for r in rows if r["impl"] == "cudnn")
    assert "ours" in capsys.readouterr().out


def test_flop_count_convention():
    # causal forward = half of 4*b*h*s^2*d; forward+backward = 3x forward (the model's MFU
    # convention, llm.model.config.attention_flops).
    fwd = bench_attention.attention_flops(2, 1024, 16, 128, True, "fwd")
    assert fwd == 2 * 2 * 16 * 1024**2 * 128
    assert bench_attention.attention_flops(2, 1024, 16, 128, True, "fwd+bwd") == 3 * fwd
    assert bench_attention.attention_flops(2, 1024, 16, 128, False, "fwd") == 2 * fwd
