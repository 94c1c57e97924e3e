"""SFT, DPO and GRPO give the same losses and updated parameters (within 1e-5, fp32) on one
device and on 8 fake CPU devices under FSDP alone (weights split 8 ways along embed/vocab) and
under tensor parallelism alone (data 4 x tensor 2: heads, MLP and vocabulary split 2 ways).
(fsdp x tp is covered by test_sft / test_dpo_sharding / test_rlhf_sharding.) One subprocess
per mesh runs all three algorithms; the three subprocesses run side by side."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import COMPILE_CACHE, REPO

pytestmark = pytest.mark.slow  # three subprocesses compiling three algorithms each

MESHES = {"fsdp": 8, "tp": 2}  # distinct shards of an MLP kernel: the rules really split it


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("posttrain_sharding"))
    env = {**os.environ, **COMPILE_CACHE, "PYTHONPATH": REPO,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    procs = {m: subprocess.Popen(
        [sys.executable, "-m", "tests.posttrain.posttrain_sharding_worker", out,
         m if m == "single" else f"gin_configs/mesh/{m}.gin"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for m in ("single", *MESHES)}
    res = {}
    for m, p in procs.items():
        stdout, stderr = p.communicate(timeout=1800)
        assert p.returncode == 0, f"{m}: {stderr[-3000:]}"
        res[m] = json.loads(stdout.strip().splitlines()[-1])
    params = {m: {"dpo": np.load(os.path.join(out, f"dpo_{m}.npy")),
                  "grpo": np.load(os.path.join(out, f"{m}.npy"))} for m in res}
    return res, params


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sft_matches_single_device(mesh, results):
    res, _ = results
    # the SFT worker itself exits non-zero unless the kernel has MESHES[mesh] distinct shards
    single, got = res["single"]["sft"], res[mesh]["sft"]
    assert single["losses"][-1] < single["losses"][0]
    np.testing.assert_allclose(got["losses"], single["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["params"], single["params"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_dpo_matches_single_device(mesh, results):
    res, params = results
    single, got = res["single"]["dpo"], res[mesh]["dpo"]
    assert got["shards"] == MESHES[mesh] and single["shards"] == 1
    np.testing.assert_allclose(got["ref"], single["ref"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["losses"], single["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(params[mesh]["dpo"], params["single"]["dpo"], rtol=0, atol=1e-5)
    assert single["losses"][2] < single["losses"][0] - 0.2  # the steps really moved the params


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_grpo_matches_single_device(mesh, results):
    res, params = results
    single, got = res["single"]["grpo"], res[mesh]["grpo"]
    assert got["shards"] == MESHES[mesh] and single["shards"] == 1
    np.testing.assert_allclose(got["advantages"], single["advantages"], atol=1e-6)
    np.testing.assert_allclose(got["losses"], single["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(params[mesh]["grpo"], params["single"]["grpo"], rtol=0,
                               atol=1e-5)
    assert len(set(single["losses"])) == 3  # each minibatch step computed a new loss
