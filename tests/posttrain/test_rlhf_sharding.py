"""GRPO's update is the same on 1 device and on 8 fake CPU devices under FSDP + tensor
parallelism (fsdp 4 x tensor 2): losses and updated parameters within 1e-5 (fp32). One
subprocess runs all meshes, so the 8-device XLA flag never leaks into this process."""

import json
import os

import numpy as np
import pytest

from tests.conftest import run_experiment

MESHES = {"fsdp_tp": 8}  # parameters split over fsdp (4) x tensor (2)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rl_sharding"))
    proc = run_experiment("tests.posttrain.rl_sharding_worker",
                          [out, "single", *[f"gin_configs/mesh/{m}.gin" for m in MESHES]],
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                          timeout=1800)  # minutes of compiling on a loaded shared machine
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res = {k.removeprefix("gin_configs/mesh/").removesuffix(".gin"): v for k, v in res.items()}
    return res, {k: np.load(os.path.join(out, f"{k}.npy")) for k in res}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_grpo_step_matches_single_device(mesh, results):
    res, params = results
    assert res[mesh]["shards"] == MESHES[mesh]  # the rules really split the weights
    np.testing.assert_allclose(res[mesh]["losses"], res["single"]["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(params[mesh], params["single"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(res[mesh]["advantages"], res["single"]["advantages"], atol=1e-6)


def test_the_updates_are_real(results):
    res, _ = results
    losses = res["single"]["losses"]
    assert len(set(losses)) == len(losses)  # every minibatch step computed a new loss
    assert any(abs(a) > 0.1 for a in res["single"]["advantages"])
