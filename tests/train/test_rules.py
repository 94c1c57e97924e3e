"""Logical-axis rules: weights and activations have separate names, so each rule set says how
a weight is stored and how an activation is laid out independently of the order of its rules;
a rule naming an axis nothing carries is an error."""

import itertools
import os

import gin
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from llm.config import ConfigError
from llm.parallel.mesh import make_mesh
from llm.parallel.rules import axis_rules, logical_to_spec
from tests.conftest import REPO

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
MLP_ACTIVATION = ("activation_batch", "activation_length", "activation_mlp")
EMBEDDING = ("vocab", "embed")
MLP_IN = ("embed", "mlp")

# Written from the rule files' comments (what each parallelism splits), not from the code. With
# no mesh given every named axis stays; "dcn" (slices) is dropped on a mesh that lacks it.
EXPECTED = {
    "dp": {ACTIVATION: P(("dcn", "data", "fsdp")), MLP_ACTIVATION: P(("dcn", "data", "fsdp")),
           EMBEDDING: P(), MLP_IN: P()},
    "fsdp": {ACTIVATION: P(("dcn", "data", "fsdp")), MLP_ACTIVATION: P(("dcn", "data", "fsdp")),
             EMBEDDING: P("fsdp"), MLP_IN: P("fsdp")},
    "tp": {ACTIVATION: P(("dcn", "data", "fsdp")),
           MLP_ACTIVATION: P(("dcn", "data", "fsdp"), None, "tensor"),
           EMBEDDING: P("tensor"), MLP_IN: P(None, "tensor")},
    "fsdp_tp": {ACTIVATION: P(("dcn", "data", "fsdp")),
                MLP_ACTIVATION: P(("dcn", "data", "fsdp"), None, "tensor"),
                EMBEDDING: P("tensor", "fsdp"), MLP_IN: P("fsdp", "tensor")},
}


def rules_of(mesh: str):
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(REPO, f"gin_configs/mesh/{mesh}.gin"),
                              skip_unknown=True)
        return axis_rules()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("mesh", sorted(EXPECTED))
def test_rule_sets_place_weights_and_activations_in_any_rule_order(mesh):
    rules = rules_of(mesh)
    for order in itertools.islice(itertools.permutations(rules), 24):
        for names, spec in EXPECTED[mesh].items():
            assert logical_to_spec(names, order) == spec, (mesh, names, order)


@pytest.mark.parametrize("rule, words", [
    (("batch", "data"), ["'batch'", "activation_batch"]),
    (("embed", "model"), ["'model'", "data, fsdp, tensor"]),
    (("embed",), ["must be a pair"]),
])
def test_bad_rules_are_config_errors(rule, words):
    with pytest.raises(ConfigError) as e:
        axis_rules([rule])
    for w in words:
        assert w in str(e.value)


def test_dcn_is_dropped_on_a_single_slice_mesh():
    """The batch rule names ("dcn", "data", "fsdp"); a mesh without "dcn" uses the rest, and a
    multi-slice mesh puts the batch over slices first."""
    one_slice = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
    two_slices = AbstractMesh((2, 1, 4, 1), ("dcn", "data", "fsdp", "tensor"))
    rules = rules_of("fsdp")
    assert logical_to_spec(("activation_batch",), rules, one_slice) == P(("data", "fsdp"))
    assert logical_to_spec(("activation_batch",), rules, two_slices) == P(("dcn", "fsdp"))
    assert logical_to_spec(MLP_IN, rules, two_slices) == P("fsdp")


@pytest.mark.parametrize("kwargs, words", [
    ({"dcn": 2}, ["dcn=2", "slices", "make_mesh.dcn"]),
    ({"dcn": 2, "slices_from": "hosts"}, ["make_mesh.slices_from='hosts'", "device_order"]),
])
def test_bad_multi_slice_meshes_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError) as e:
        make_mesh(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_activation_sharding_context_is_per_thread():
    """A trace in one thread (the server's engine) never sees another thread's mesh."""
    import threading

    from llm.parallel.rules import activation_sharding, active_spec

    mesh = AbstractMesh((2, 1, 1), ("data", "fsdp", "tensor"))
    seen = []
    with activation_sharding(mesh, rules_of("dp")):
        assert active_spec(("activation_batch",), (4,)) == (mesh, P("data"))
        thread = threading.Thread(target=lambda: seen.append(
            active_spec(("activation_batch",), (4,))))
        thread.start()
        thread.join()
    assert seen == [None]
    assert active_spec(("activation_batch",), (4,)) is None
