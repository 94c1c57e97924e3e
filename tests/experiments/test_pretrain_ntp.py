"""The run-directory contract of `experiments.pretrain_ntp` (levanter-style tiny end-to-end run)."""

import json
import os

import numpy as np
from PIL import Image

from llm.train.metrics import read_metrics


def load(*path: str) -> dict:
    with open(os.path.join(*path)) as f:
        return json.load(f)


def test_run_directory_contract(tiny_run, tiny_data):
    files = set(os.listdir(tiny_run))
    assert {"manifest.json", "config.gin", "metrics.jsonl", "eval.json", "checkpoints", "tb",
            "plots"} <= files

    manifest = load(tiny_run, "manifest.json")
    dataset = load(tiny_data, "dataset.json")
    assert manifest["data"]["fingerprint"] == dataset["fingerprint"]
    assert manifest["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert manifest["seed"] == 0
    assert "TrainConfig.steps = 12" in manifest["gin_config"]
    assert manifest["packages"]["jax"] and manifest["packages"]["orbax-checkpoint"]
    assert "commit" in manifest["git"]

    metrics = read_metrics(os.path.join(tiny_run, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == list(range(1, 13))
    flops_per_token = manifest["model"]["flops_per_token"]
    for m in metrics:
        assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu"} <= set(m)
        assert np.isfinite(m["loss"]) and m["tokens_per_s"] > 0
        # peak_flops.per_device=1e11 (tiny_run_args), one device
        np.testing.assert_allclose(m["mfu"], flops_per_token * m["tokens_per_s"] / 1e11,
                                   rtol=1e-9)
    assert metrics[0]["learning_rate"] == 0.0 and metrics[2]["learning_rate"] > 0  # warmup

    ev = load(tiny_run, "eval.json")
    val = dataset["splits"]["validation"]
    assert ev["tokens"] == val["num_tokens"]  # every validation token scored exactly once
    bpb = ev["loss"] * ev["tokens"] / np.log(2) / val["num_bytes"]
    np.testing.assert_allclose(ev["bits_per_byte"], bpb, rtol=1e-9)
    np.testing.assert_allclose(ev["gzip_bits_per_byte"], 8 * val["gzip_bytes"] / val["num_bytes"])
    np.testing.assert_allclose(ev["perplexity"], np.exp(ev["loss"]), rtol=1e-9)

    assert sorted(int(d) for d in os.listdir(os.path.join(tiny_run, "checkpoints"))
                  if d.isdigit())[-1] == 12
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(
        os.path.join(tiny_run, "tb")))
    png = Image.open(os.path.join(tiny_run, "plots", "loss.png"))
    assert png.size[0] > 400 and png.size[1] > 200
