"""Sharding equivalence for the encoder and encoder-decoder: 5 training steps on the real
objective rows give the same losses on 1 device and on 8 fake CPU devices under FSDP x tensor
parallel (batch over 4 devices, cross-attention and the MLM head split over fsdp and tensor; the
data-parallel path is the decoder's, tested in tests/train). One subprocess, so the 8-device XLA
flag never leaks into this one."""

import json

import numpy as np
import pytest

from tests.conftest import run_experiment

MODELS = ["encoder", "encoder_decoder"]
MESHES = ["fsdp_tp"]


@pytest.fixture(scope="module")
def losses() -> dict[str, list[float]]:
    configs = [f"{m}:single" for m in MODELS] + [f"{m}:gin_configs/mesh/{mesh}.gin"
                                                 for m in MODELS for mesh in MESHES]
    proc = run_experiment("tests.mlm.sharding_worker", configs,
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k.replace("gin_configs/mesh/", "").removesuffix(".gin"): v for k, v in out.items()}


@pytest.mark.parametrize("model", MODELS)
def test_single_device_trains(model, losses):
    print(f"\n{model}: losses {losses[f'{model}:single']}")
    assert losses[f"{model}:single"][-1] < losses[f"{model}:single"][0] - 0.1


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", MODELS)
def test_mesh_matches_single_device(model, mesh, losses):
    np.testing.assert_allclose(losses[f"{model}:{mesh}"], losses[f"{model}:single"], rtol=0,
                               atol=1e-5)
