"""LanguageModel sharded on 8 fake CPU devices with the training rule sets gives the numbers of
one device (to float-reduction tolerance: the matmuls are split differently across shards)."""

import json

import numpy as np
import pytest

from tests.conftest import run_experiment


@pytest.fixture(scope="module")
def scores(tiny_run) -> dict:
    configs = ["single", "gin_configs/mesh/dp.gin", "gin_configs/mesh/fsdp_tp.gin"]
    proc = run_experiment("tests.eval.sharding_worker", [tiny_run, *configs],
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k.removeprefix("gin_configs/mesh/").removesuffix(".gin"): v for k, v in out.items()}


@pytest.mark.parametrize("mesh", ["dp", "fsdp_tp"])
def test_mesh_matches_single_device(mesh, scores):
    ll, rolling, text, _ = scores[mesh]
    np.testing.assert_allclose(ll, scores["single"][0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(rolling, scores["single"][1], rtol=1e-5, atol=1e-3)
    assert text == scores["single"][2]


def test_params_are_sharded_by_the_rules(scores):
    # fsdp_tp: vocab -> tensor, embed -> fsdp (gin_configs/mesh/fsdp_tp.gin)
    assert scores["fsdp_tp"][3] == "P('tensor', 'fsdp')"
    assert scores["dp"][3] == "P()"
