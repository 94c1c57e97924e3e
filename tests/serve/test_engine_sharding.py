"""The engine on an 8-device FSDP x tensor-parallel mesh (fake CPU devices, in a subprocess)
gives the single-device greedy tokens and logprobs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_experiment


@pytest.mark.slow
def test_fsdp_tp_mesh_matches_one_device(tiny_run):
    proc = run_experiment("tests.serve.sharding_worker", [tiny_run], env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    single, sharded = out["single"], out["fsdp_tp"]
    assert "fsdp" in sharded["sharding"] or "tensor" in sharded["sharding"]
    assert sharded["tokens"] == single["tokens"]
    for a, b in zip(sharded["logprobs"], single["logprobs"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
