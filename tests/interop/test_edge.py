"""The edge export (tools/export_edge.py): serialized StableHLO and a TFLite flatbuffer of the
decode step, each run on a prompt against the JAX model (the tiny run), and a bad --cache_len."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools.export_edge import PARITY_ATOL, _tflite_interpreter, export_edge

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_stablehlo_and_tflite_match_jax(tiny_run, tmp_path):
    pytest.importorskip("tensorflow")
    import jax

    from llm.runs import load_run
    from llm.serve.engine import BOS_ID
    from llm.serve.sampler import generate

    text = tmp_path.parent / "eval.txt"
    text.write_text(Path(json.__file__).read_text()[:2000])
    meta = export_edge(tiny_run, str(tmp_path), cache_len=64, new_tokens=12, prefill_len=16,
                       eval_text=str(text), eval_tokens=80)
    programs = ("decode_step", "prefill")
    assert set(os.listdir(tmp_path)) == {"edge.json"} | {
        f"{p}{ext}" for p in programs for ext in (".stablehlo", ".tflite", "_int8.tflite")}
    assert json.loads((tmp_path / "edge.json").read_text())["parity"] == meta["parity"]
    # fp32: the decode flow (prompt stepped through decode_step) and the prefill flow (prompt in
    # one prefill call, then decode_step) both match JAX's decode flow.
    for key in ("parity", "parity_prefill"):
        for name in ("stablehlo", "tflite"):
            assert meta[key][name]["max_abs_logit_diff_vs_jax"] <= PARITY_ATOL, meta
            assert meta[key][name]["greedy_tokens_equal_jax"], meta
    assert meta["parity_prefill"]["jax"]["max_abs_logit_diff_vs_jax"] <= PARITY_ATOL
    # Dynamic-range int8: every weight matrix is int8 (the file is near a quarter of fp32 plus
    # the graph), the logits are close (per-channel int8 weights, activations quantized on the
    # fly), and the first greedy token (fed identical inputs) agrees.
    for program in programs:
        fp32, int8 = (meta["bytes"][f"{fmt}/{program}"] for fmt in ("tflite", "tflite_int8"))
        assert int8 < 0.4 * fp32, meta["bytes"]
        interp = _tflite_interpreter(str(tmp_path / f"{program}_int8.tflite"))
        weights = [d for d in interp.get_tensor_details() if len(d["shape"]) == 2
                   and min(d["shape"]) >= run_cfg_dim(tiny_run)]
        assert weights and all(d["dtype"] == np.int8 for d in weights), weights
    # Teacher-forced over 80 tokens of text (2 windows of 63 + BOS): fp32 formats agree on
    # every top-1 token, int8 on most.
    forced = meta["teacher_forced"]
    assert forced["tokens"] == 80
    assert forced["stablehlo"]["top1_agreement_vs_jax"] == 1.0
    assert forced["tflite"]["top1_agreement_vs_jax"] == 1.0
    assert forced["tflite"]["max_abs_logit_diff_vs_jax"] <= PARITY_ATOL
    assert forced["tflite_int8"]["top1_agreement_vs_jax"] >= 0.8, forced
    for key in ("parity", "parity_prefill"):
        int8 = meta[key]["tflite_int8"]
        assert int8["max_abs_logit_diff_same_inputs"] <= 0.1 * meta["max_abs_logit_jax"], meta
        assert int8["greedy_tokens_agreeing_before_first_difference"] >= 1, meta
    # The file alone (a fresh deserialize, no model code) gives the sampler's first greedy token.
    run = load_run(tiny_run)
    ids = [BOS_ID, *run.tokenizer.encode("def fibonacci(n):\n")]
    restored = jax.export.deserialize(bytearray((tmp_path / "decode_step.stablehlo").read_bytes()))
    cache = [np.zeros(a.shape, a.dtype) for a in restored.in_avals[2:]]
    for pos, tok in enumerate(ids):
        out = restored.call(np.array([tok], np.int32), np.array([pos], np.int32), *cache)
        cache = list(out[1:])
    ref = generate(run.graphdef, run.params, run.cfg, [ids], max_new_tokens=1, temperature=0.0,
                   top_k=0, eos_id=-1)[0]
    assert int(np.argmax(np.asarray(out[0])[0])) == ref[0]


def run_cfg_dim(run_dir: str) -> int:
    from llm.runs import load_run

    return load_run(run_dir).cfg.d_model


def test_cache_too_short_is_one_line(tiny_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.export_edge", f"--run_dir={tiny_run}",
                           f"--out={tmp_path / 'e'}", "--cache_len=8", "--no_tflite"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--cache_len=8" in proc.stderr
