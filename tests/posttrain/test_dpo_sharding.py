"""DPO's reference pass and update are the same on 1 device and on 8 fake CPU devices under
FSDP + tensor parallelism (fsdp 4 x tensor 2): losses and updated parameters within 1e-5 (fp32).
One subprocess runs both meshes, so the 8-device XLA flag never leaks into this process."""

import json
import os

import numpy as np
import pytest

from tests.conftest import run_experiment

MESHES = {"fsdp_tp": 8}


pytestmark = pytest.mark.slow  # two meshes compiled in a subprocess


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo_sharding"))
    proc = run_experiment("tests.posttrain.dpo_sharding_worker",
                          [out, "single", *[f"gin_configs/mesh/{m}.gin" for m in MESHES]],
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res = {k.removeprefix("gin_configs/mesh/").removesuffix(".gin"): v for k, v in res.items()}
    return res, {k: np.load(os.path.join(out, f"dpo_{k}.npy")) for k in res}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_dpo_step_matches_single_device(mesh, results):
    res, params = results
    assert res[mesh]["shards"] == MESHES[mesh]  # the rules really split the weights
    np.testing.assert_allclose(res[mesh]["ref"], res["single"]["ref"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(res[mesh]["losses"], res["single"]["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(params[mesh], params["single"], rtol=0, atol=1e-5)


def test_the_updates_are_real(results):
    res, _ = results
    losses = res["single"]["losses"]
    assert losses[0] != pytest.approx(np.log(2), abs=1e-4)  # the reference differs
    assert losses[2] < losses[0] - 0.2
