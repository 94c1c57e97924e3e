"""Run 4 distillation steps (online teacher) on a given mesh; print the losses as JSON.

Used by test_sharding.py in a subprocess with 8 fake CPU devices.
usage: python -m tests.distill.sharding_worker <mesh>...  (a gin file under gin_configs/mesh/ or
'single'). The teacher (3 layers, d_model 96) and the student (2 layers, d_model 64) are
random-initialised with fixed seeds; the loss mixes forward KL at T=2 with the hard labels.
"""

import json
import sys

import jax

from llm.distill.losses import DistillLoss
from llm.distill.step import distill_loss_fn
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.rules import tree_shardings
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, jit_train_step
from tests.train.sharding_worker import configure, synthetic_batch

STUDENT = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=128, attention_impl="xla")
TEACHER = ModelConfig(vocab_size=128, d_model=96, num_layers=3, num_heads=4, num_kv_heads=2,
                      mlp_dim=192, attention_impl="xla")


def main(mesh_file: str) -> list[float]:
    mesh, rules = configure(mesh_file)
    t_graphdef, t_abstract, t_axes = transformer.abstract(TEACHER)
    t_shardings = tree_shardings(t_axes, t_abstract, mesh, rules)
    teacher = jax.jit(lambda k: transformer.init(TEACHER, k)[1],
                      out_shardings=t_shardings)(jax.random.key(7))
    graphdef, abstract_params, axes = transformer.abstract(STUDENT)
    tx, schedule = make_optimizer(total_steps=4)
    state, shardings = create_train_state(lambda k: transformer.init(STUDENT, k)[1],
                                          abstract_params, axes, tx, mesh, rules, seed=0)
    loss_fn = distill_loss_fn(graphdef, t_graphdef,
                              DistillLoss(divergence="forward_kl", temperature=2.0, alpha=0.5))
    step = jit_train_step(shardings, mesh, rules, frozen_shardings=t_shardings, loss_fn=loss_fn,
                          tx=tx, schedule=schedule)
    name = mesh_file.rsplit("/", 1)[-1].removesuffix(".gin")
    kernel = teacher["layer_0"]["mlp"]["wi"]["kernel"]
    want = {"single": 1, "dp": 1, "fsdp": 8, "tp": 2, "fsdp_tp": 8}[name]
    if len({str(s.index) for s in kernel.addressable_shards}) != want:
        raise SystemExit(f"{name}: the teacher's wi kernel is not split {want} ways")
    losses = []
    for i in range(4):
        batch = jax.device_put(synthetic_batch(i), batch_sharding(mesh, rules))
        state, metrics = step(state, batch, teacher)
        losses.append([float(metrics["loss"]), float(metrics["divergence"])])
    return losses


if __name__ == "__main__":
    print(json.dumps({config: main(config) for config in sys.argv[1:]}))
