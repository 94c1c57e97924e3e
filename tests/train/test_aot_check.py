"""tools/aot_check.py: the verdict from XLA's memory analysis of the real train step on 8 fake
CPU devices (always), and the libtpu compile for a small and a too-large config (when the side
venv with libtpu exists)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

CPU_WORKER = r"""
import json, jax
from experiments import pretrain_ntp
from llm.config import parse_gin
from llm.model.config import ModelConfig
from tools import aot_check
parse_gin(["gin_configs/debug/tiny.gin"] + FILES, ["TrainConfig.global_batch_size=16"] + EXTRA)
compiled, model_flops, mesh = aot_check.compile_train_step(jax.devices(), vocab_size=512)
cfg = ModelConfig(vocab_size=512)
print(json.dumps({"memory": aot_check.memory_of(compiled), "params": cfg.num_params(),
                  "mesh": mesh}))
"""


def cpu_memory(files: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    code = f"FILES = {files!r}\nEXTRA = []\n" + CPU_WORKER
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dp_and_fsdp() -> tuple[dict, dict]:
    return cpu_memory([]), cpu_memory(["gin_configs/mesh/fsdp.gin"])


def test_memory_analysis_matches_hand_count(dp_and_fsdp):
    dp, fsdp = dp_and_fsdp
    assert dp["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    # Data parallel: every device holds the whole state, float32 params + AdamW's two moments
    # (3 x 4 bytes per parameter), plus its 2 of the 16 rows of 5 [seq=64] fields of 4 bytes.
    state = 12 * dp["params"]
    batch = 2 * 64 * 5 * 4
    m = dp["memory"]
    assert state + batch <= m["arguments"] <= state + batch + 4096  # + step, counts, scalars
    assert m["aliased"] >= state  # the donated state is updated in place


def test_verdict_fits_and_does_not_fit(dp_and_fsdp):
    from tools.aot_check import GiB, peak_bytes, verdict

    m = dp_and_fsdp[0]["memory"]
    total = peak_bytes(m)
    assert total == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    assert verdict(m, total).startswith("fits:")
    short = verdict(m, total // 2)
    assert short.startswith("does not fit:")
    # by how much: total - hbm, in GiB with two decimals
    assert f"{(total - total // 2) / GiB:.2f} GiB" in short
    # The tiny state is most of the bytes: the verdict asks for FSDP.
    assert "FSDP" in verdict(m, m["arguments"] // 2 + 1)
    acts = {"arguments": 1 * GiB, "outputs": 0, "aliased": 0, "temporaries": 30 * GiB}
    v = verdict(acts, 16 * GiB)
    assert v.startswith("does not fit: needs 31.00 GiB") and "remat" in v and "FSDP" not in v


def test_fsdp_shards_the_state(dp_and_fsdp):
    dp, fsdp = dp_and_fsdp
    assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert fsdp["memory"]["arguments"] < dp["memory"]["arguments"] / 2


def aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/aot_check.py", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                          text=True, timeout=600)


def test_unknown_topology_is_one_line():
    proc = aot("--topology=v7-8")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "v7-8" in proc.stderr and "v5e-8" in proc.stderr and "v5p-64" in proc.stderr


TPU_PYTHON = os.environ.get("LLM_TPU_PYTHON", "/tmp/tpuenv/bin/python")
needs_libtpu = pytest.mark.skipif(
    not os.path.isfile(TPU_PYTHON),
    reason=f"no side venv with libtpu at {TPU_PYTHON} (pip install 'jax[tpu]==<jax version>' "
           "there, or set LLM_TPU_PYTHON)")
BIG = ["--vocab_size=32000", "--gin_param=ModelConfig.d_model=4096",
       "--gin_param=ModelConfig.num_layers=2", "--gin_param=ModelConfig.mlp_dim=14336",
       "--gin_param=ModelConfig.num_heads=32", "--gin_param=ModelConfig.num_kv_heads=8",
       "--gin_param=TrainConfig.seq_len=2048", "--gin_param=TrainConfig.global_batch_size=64"]


@pytest.mark.tpu
@needs_libtpu
def test_libtpu_small_config_fits(tmp_path):
    proc = aot("--gin_file=gin_configs/debug/tiny.gin", "--topology=v5e-8", "--vocab_size=512",
               f"--json={tmp_path / 'r.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 8
    assert proc.stdout.strip().splitlines()[-1].startswith("fits:")
    assert r["flops_per_device"] > 0 and 0 < r["predicted_mfu"] <= 1


@pytest.mark.tpu
@needs_libtpu
def test_libtpu_large_config_does_not_fit(tmp_path):
    proc = aot("--gin_file=gin_configs/debug/tiny.gin", "--topology=v5e-4", *BIG,
               f"--json={tmp_path / 'r.json'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit:") and "remat" in last
    # Hand count of the state: 2 layers of 4 x 4096^2 attention (GQA: q, o full; k, v a quarter)
    # and 3 x 4096 x 14336 MLP, plus one embedding of 32000 x 4096 (tied
    # with the output, ModelConfig.tie_embeddings's default) (float32 params
    # and two moments; data parallel, so whole on each device). The arguments must hold it.
    attn = 4096 * 4096 * 2 + 2 * 4096 * 1024
    params = 2 * (attn + 3 * 4096 * 14336) + 32000 * 4096
    assert r["memory_per_device"]["arguments"] >= 12 * params
    assert r["memory_per_device"]["arguments"] < 12 * params * 1.01


@needs_libtpu
def test_gin_that_does_not_build_is_one_line():
    proc = aot("--gin_file=gin_configs/debug/tiny.gin", "--gin_param=ModelConfig.bogus=1",
               "--topology=v5e-8")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "ModelConfig.bogus=1" in proc.stderr and "Traceback" not in proc.stderr
