"""3 LoRA training steps of a tiny model on a mesh; print losses, the adapters and their
shardings as JSON. Used by test_lora.py in a subprocess with 8 fake CPU devices.

usage: python -m tests.train.lora_sharding_worker <mesh>...  (gin_configs/mesh/*.gin or 'single')
"""

import functools
import json
import sys

import jax
import numpy as np

from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.rules import tree_shardings
from llm.train import lora
from llm.train.loss import decoder_loss
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, jit_train_step
from tests.train.sharding_worker import configure, synthetic_batch


def main(mesh_file: str) -> dict:
    mesh, rules = configure(mesh_file)
    cfg = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=128, attention_impl="xla")
    graphdef, abstract_params, axes = transformer.abstract(cfg)
    plan = lora.make_plan(graphdef, abstract_params, axes,
                          lora.LoraConfig(enabled=True, rank=4, quant="nf4", group_size=32))
    tx, schedule = make_optimizer(total_steps=3)
    base_sh = tree_shardings(axes, abstract_params, mesh, rules)
    base = jax.jit(lambda k: transformer.init(cfg, k)[1], out_shardings=base_sh)(
        jax.random.key(0))
    frozen = jax.jit(functools.partial(lora.freeze, plan))(base)
    state, shardings = create_train_state(
        functools.partial(lora.init_adapters, plan), lora.abstract_adapters(plan, abstract_params),
        lora.adapter_axes(plan, axes), tx, mesh, rules, seed=0)
    step = jit_train_step(shardings, mesh, rules,
                          frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen),
                          loss_fn=lora.adapted_loss(plan, decoder_loss(graphdef), 0), tx=tx,
                          schedule=schedule)
    losses = []
    for i in range(3):
        batch = jax.device_put(synthetic_batch(i), batch_sharding(mesh, rules))
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    q = state.params["layer_0"]["attn"]["q"]["kernel"]
    return {"losses": losses,
            "adapters": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
            "q_a_spec": str(q["a"].sharding.spec), "q_b_spec": str(q["b"].sharding.spec)}


if __name__ == "__main__":
    print(json.dumps({m: main(m) for m in sys.argv[1:]}))
