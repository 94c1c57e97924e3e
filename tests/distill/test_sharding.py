"""The distillation step (online teacher inside the jitted step, teacher sharded by the same
rules) gives the same losses on 8 fake CPU devices as on 1, in a subprocess so the device-count
flag stays out of this process."""

import json

import numpy as np
import pytest

from tests.conftest import run_experiment

MESHES = ["fsdp_tp"]


@pytest.fixture(scope="module")
def losses() -> dict:
    proc = run_experiment("tests.distill.sharding_worker",
                          ["single", *[f"gin_configs/mesh/{m}.gin" for m in MESHES]],
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k.removeprefix("gin_configs/mesh/").removesuffix(".gin"): v for k, v in out.items()}


def test_single_device_distills(losses):
    loss = [objective for objective, _ in losses["single"]]
    assert loss[-1] < loss[0]  # the steps really train


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_single_device(mesh, losses):
    np.testing.assert_allclose(losses[mesh], losses["single"], rtol=0, atol=1e-5)
