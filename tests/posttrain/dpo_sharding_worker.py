"""Run DPO's reference pass and three optimizer steps (the shared train_step with dpo_loss_fn) on
fixed synthetic pairs for a mesh; print the losses (JSON) and save the updated params (npy).

Used by test_dpo_sharding.py in a subprocess with 8 fake CPU devices.
usage: python -m tests.posttrain.dpo_sharding_worker <out_dir> <mesh>...  (mesh: a gin file
under gin_configs/mesh/ or 'single'). Prints {mesh: {"losses": [...], "shards": n}}.
"""

import json
import os
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np

from llm.model import transformer
from llm.parallel.rules import tree_shardings
from llm.posttrain import dpo
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import jit_train_step
from tests.posttrain.rl_sharding_worker import CFG, host_params
from tests.train.sharding_worker import configure

PAIRS, SEQ = 8, 16


def synthetic_pairs() -> dict:
    rng = np.random.default_rng(2)
    rows = {}
    for side in ("chosen", "rejected"):
        rows[side] = rng.integers(2, CFG.vocab_size, (PAIRS, SEQ)).astype(np.int32)
        lengths = rng.integers(2, 9, PAIRS)
        pos = np.arange(SEQ)[None]
        rows[f"{side}_mask"] = ((pos >= 6) & (pos < 6 + lengths[:, None])).astype(np.float32)
    return rows


def main(mesh_file: str, out_dir: str) -> dict:
    mesh, rules = configure(mesh_file)
    # Adam turns reduction-order noise in near-zero gradients into steps of up to the learning
    # rate (see rl_sharding_worker): 3e-4 keeps that under the 1e-5 tolerance.
    gin.parse_config("learning_rate_schedule.peak = 3e-4")
    graphdef, abstract, axes = transformer.abstract(CFG)
    shardings = tree_shardings(axes, abstract, mesh, rules)
    params = host_params(abstract)
    reference = jax.device_put(jax.tree.map(lambda x: x * 1.02, params), shardings)
    rows = dpo.reference_logps(graphdef, reference, synthetic_pairs(), PAIRS // 2, mesh, rules)
    tx, schedule = make_optimizer(total_steps=3)

    def init(key):
        del key
        return params
    init.loads_params = True
    state, state_shardings = create_train_state(init, abstract, axes, tx, mesh, rules, seed=0)
    loss_fn = dpo.dpo_loss_fn(graphdef, dpo.DPOConfig(beta=0.5))
    step = jit_train_step(state_shardings, mesh, rules, loss_fn=loss_fn, tx=tx,
                          schedule=schedule)
    batch = {k: jax.device_put(jnp.asarray(v)) for k, v in rows.items()}
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    kernel = state.params["layer_0"]["mlp"]["wi"]["kernel"]
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
    name = mesh_file.rsplit("/", 1)[-1].removesuffix(".gin")
    np.save(os.path.join(out_dir, f"dpo_{name}.npy"), flat)
    return {"losses": losses, "ref": np.asarray(rows["ref_chosen"]).sum(1).tolist(),
            "shards": len({str(s.index) for s in kernel.addressable_shards})}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    print(json.dumps({m: main(m, out_dir) for m in sys.argv[2:]}))
