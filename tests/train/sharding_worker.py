"""Run 5 training steps of a tiny model on a given mesh/rule set; print the losses as JSON.

Used by test_sharding.py in a subprocess with 8 fake CPU devices.
usage: python -m tests.train.sharding_worker <config>...  where config is
"<mesh>[:accum[:attention_impl]]" and
mesh is a gin file under gin_configs/mesh/, 'single', or 'fsdp_dcn': FSDP inside each of 2
simulated slices of 4 devices (`make_mesh.dcn = 2`, slices_from="device_order"), data parallel
across them. Prints {config: losses} as JSON.
"""

import json
import sys

import gin
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.mesh import make_mesh
from llm.parallel.rules import axis_rules
from llm.train.loss import decoder_loss
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, jit_train_step


def synthetic_batch(step: int, batch: int = 8, seq: int = 32, vocab: int = 128) -> dict:
    rng = np.random.default_rng(step)
    # Learnable data: each row counts upward from a random start, so the loss falls fast.
    start = rng.integers(3, vocab, (batch, 1))
    targets = (3 + (start + np.arange(seq)) % (vocab - 3)).astype(np.int32)
    segment_ids = np.where(np.arange(seq) < seq // 2, 1, 2)[None].repeat(batch, 0).astype(np.int32)
    positions = np.where(segment_ids == 1, np.arange(seq), np.arange(seq) - seq // 2)
    inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    inputs[:, seq // 2] = 0
    return {"inputs": inputs, "targets": targets, "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": segment_ids, "positions": positions.astype(np.int32)}


def configure(mesh_file: str):
    """Fresh gin config (a fast-learning schedule + the mesh file) -> (mesh, rules). 'single' is
    a one-device mesh on the first of the 8 fake devices."""
    gin.clear_config()
    gin.parse_config(["learning_rate_schedule.peak = 1e-2",
                      "learning_rate_schedule.warmup_steps = 0"])
    if mesh_file == "single":
        gin.parse_config(["make_mesh.data = 1"])
        devices = jax.devices()[:1]
    elif mesh_file == "fsdp_dcn":
        gin.parse_config_file("gin_configs/mesh/fsdp.gin")
        gin.parse_config(["make_mesh.dcn = 2", "make_mesh.slices_from = 'device_order'"])
        devices = None
    else:
        gin.parse_config_file(mesh_file)
        devices = None
    return make_mesh(devices=devices), axis_rules()


def check_slices(mesh, rules, kernel) -> None:
    """The simulated layout: slice s is devices 4s..4s+3 (the dcn axis is outermost); each slice
    holds a whole copy of the weights (the same shard at the same in-slice position, so the
    only cross-slice traffic is the gradient all-reduce), and the batch is split over slices."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    if dict(mesh.shape) != {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1} or \
            sorted(ids[0].ravel()) != [0, 1, 2, 3] or sorted(ids[1].ravel()) != [4, 5, 6, 7]:
        raise SystemExit(f"fsdp_dcn: mesh {dict(mesh.shape)} with device ids {ids.tolist()}")
    index = {s.device.id: str(s.index) for s in kernel.addressable_shards}
    for a, b in zip(ids[0].ravel(), ids[1].ravel()):
        if index[a] != index[b]:
            raise SystemExit(f"fsdp_dcn: devices {a} and {b} (same place in slices 0 and 1) hold "
                             f"different weight shards {index[a]} / {index[b]}")
    if batch_sharding(mesh, rules).spec != P(("dcn", "fsdp")):
        raise SystemExit(f"fsdp_dcn: batch sharding {batch_sharding(mesh, rules).spec}")


def main(mesh_file: str, accum_steps: int = 1, attention_impl: str = "xla") -> list[float]:
    mesh, rules = configure(mesh_file)
    cfg = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=128, attention_impl=attention_impl)
    graphdef, abstract_params, axes = transformer.abstract(cfg)
    tx, schedule = make_optimizer(total_steps=5)
    state, shardings = create_train_state(lambda k: transformer.init(cfg, k)[1], abstract_params,
                                          axes, tx, mesh, rules, seed=0)
    step = jit_train_step(shardings, mesh, rules, loss_fn=decoder_loss(graphdef), tx=tx,
                          schedule=schedule, accum_steps=accum_steps)
    kernel = state.params["layer_0"]["mlp"]["wi"]["kernel"]
    expected = {"single": 1, "dp": 1, "fsdp": 8, "tp": 2, "fsdp_tp": 8, "fsdp_dcn": 4}
    name = mesh_file.rsplit("/", 1)[-1].removesuffix(".gin")
    shards = len({str(s.index) for s in kernel.addressable_shards})
    if shards != expected[name]:  # the rule set really split the weights
        raise SystemExit(f"{name}: wi kernel has {shards} distinct shards, want {expected[name]}")
    if name == "fsdp_dcn":
        check_slices(mesh, rules, kernel)
    losses = []
    for i in range(5):
        batch = jax.device_put(synthetic_batch(i), batch_sharding(mesh, rules))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


if __name__ == "__main__":
    results = {}
    for config in sys.argv[1:]:
        mesh, accum, impl = (config.split(":") + ["", ""])[:3]
        results[config] = main(mesh, int(accum or 1), impl or "xla")
    print(json.dumps(results))
