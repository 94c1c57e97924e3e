"""Sharding equivalence: 5 training steps give the same losses on 1 device and on 8 fake CPU
devices under data parallel, FSDP, tensor parallel and FSDP+TP (and with gradient accumulation,
and with the Pallas flash-attention kernel, interpreted on CPU, in place of the jnp attention).
All configurations run in one subprocess so the 8-device XLA flag never leaks into this one."""

import json

import numpy as np
import pytest

from tests.conftest import run_experiment

MESHES = ["dp", "fsdp", "tp", "fsdp_tp"]  # and fsdp_dcn: FSDP in each of 2 simulated slices


@pytest.fixture(scope="module")
def losses() -> dict[str, list[float]]:
    configs = (["single", "single:4", "single:1:pallas", "gin_configs/mesh/fsdp_tp.gin:1:pallas"]
               + [f"gin_configs/mesh/{m}.gin" for m in MESHES] + ["fsdp_dcn"])
    proc = run_experiment("tests.train.sharding_worker", configs,
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k.removeprefix("gin_configs/mesh/").removesuffix(".gin"): v for k, v in out.items()}


def test_single_device_trains(losses):
    assert losses["single"][-1] < losses["single"][0] - 0.5  # the steps really learn


@pytest.mark.parametrize("mesh", [*MESHES, "fsdp_dcn"])
def test_mesh_matches_single_device(mesh, losses):
    np.testing.assert_allclose(losses[mesh], losses["single"], rtol=0, atol=1e-5)


def test_gradient_accumulation_matches(losses):
    np.testing.assert_allclose(losses["single:4"], losses["single"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", ["single:1:pallas", "fsdp_tp.gin:1:pallas"])
def test_pallas_attention_trains_like_xla(config, losses):
    """Tolerance 1e-5 (fp32): the kernel's online softmax reorders the sums."""
    key = next(k for k in losses if k.endswith(config))
    np.testing.assert_allclose(losses[key], losses["single"], rtol=0, atol=1e-5)
