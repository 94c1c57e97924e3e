"""Run GRPO's prepare + two minibatch updates on a fixed synthetic rollout batch for a mesh;
print the losses (JSON) and save the updated policy params (npz).

Used by test_rlhf_sharding.py in a subprocess with 8 fake CPU devices.
usage: python -m tests.posttrain.rl_sharding_worker <out_dir> <mesh>...  (mesh: a gin file
under gin_configs/mesh/ or 'single'). Prints {mesh: {"losses": [...], "shards": n}}.
"""

import json
import os
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm.model import transformer
from llm.model.config import ModelConfig
from llm.parallel.rules import tree_shardings
from llm.posttrain import grpo
from llm.posttrain.rl_loop import RLConfig, RLState, init_opt_state, make_steps
from llm.train.optimizer import make_optimizer
from tests.train.sharding_worker import configure

CFG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=128, attention_impl="xla")
RC = RLConfig(prompts_per_step=4, samples_per_prompt=2, max_prompt_len=4, max_new_tokens=12,
              minibatches=2, kl_coef=0.1)


def host_params(abstract: dict) -> dict:
    """Deterministic random weights (norm scales 1): no init program to compile."""
    rng = np.random.default_rng(0)

    def leaf(path, a):
        if getattr(path[-1], "key", None) == "scale":
            return np.ones(a.shape, np.float32)
        return rng.normal(0, 0.1, a.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


# Minibatch rows of the three updates (4 of the 8 rollout rows each).
MINIBATCHES = ([0, 2, 4, 6], [1, 3, 5, 7], [0, 1, 2, 3])


def synthetic_batch(rc: RLConfig = RC) -> dict:
    rng = np.random.default_rng(1)
    rows, seq = rc.batch_size, rc.max_prompt_len + rc.max_new_tokens
    tokens = rng.integers(2, CFG.vocab_size, (rows, seq)).astype(np.int32)
    lengths = rng.integers(3, rc.max_new_tokens + 1, rows)
    pos = np.arange(seq)[None]
    mask = ((pos >= rc.max_prompt_len) & (pos < rc.max_prompt_len + lengths[:, None]))
    scores = rng.integers(0, 3, rows).astype(np.float32)
    return {"tokens": np.where(pos < rc.max_prompt_len + lengths[:, None], tokens, 0),
            "response_mask": mask.astype(np.float32), "scores": scores}


def main(mesh_file: str, out_dir: str, rc: RLConfig = RC, minibatches=MINIBATCHES,
         lr: float = 1e-3) -> dict:
    """rc / minibatches: the rollout batch layout and the rows of each update (a mesh that
    splits the batch 8 ways needs minibatches of a multiple of 8 rows); lr: Adam's step (see
    below)."""
    mesh, rules = configure(mesh_file)
    # Adam turns near-zero gradients into steps of about the learning rate, so reduction-order
    # noise in a gradient of ~1e-9 moves its parameter by up to lr: keep lr at 1e-3 (not the
    # pretraining worker's 1e-2) to compare updated parameters at 1e-5.
    gin.parse_config(f"learning_rate_schedule.peak = {lr}")
    graphdef, abstract, axes = transformer.abstract(CFG)
    shardings = tree_shardings(axes, abstract, mesh, rules)
    params = host_params(abstract)
    tx, _ = make_optimizer(total_steps=4)
    replicated = NamedSharding(mesh, PartitionSpec())
    policy = jax.device_put(params, shardings)
    frozen = {"reference": jax.device_put(params, shardings)}
    state = RLState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                    params=policy, value={},
                    opt_state=init_opt_state(tx, {"policy": policy, "value": {}}, mesh),
                    rng=jax.device_put(jax.random.key_data(jax.random.key(0)), replicated),
                    kl_coef=jax.device_put(jnp.float32(rc.kl_coef), replicated))
    batch = synthetic_batch(rc)
    steps = make_steps(grpo.make_algorithm(graphdef, rc), tx,
                       jax.tree.map(lambda x: x.sharding, state),
                       jax.tree.map(lambda x: x.sharding, frozen), batch, mesh, rules,
                       lambda policy, frozen: (policy, frozen["reference"]))
    prepared = steps.prepare(state, frozen, batch)
    losses = []
    for idx in minibatches:
        state, metrics = steps.update(state, frozen, prepared, jnp.asarray(idx, jnp.int32))
        losses.append(float(metrics["loss"]))
    kernel = state.params["layer_0"]["mlp"]["wi"]["kernel"]
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
    name = mesh_file.rsplit("/", 1)[-1].removesuffix(".gin")
    np.save(os.path.join(out_dir, f"{name}.npy"), flat)
    return {"losses": losses, "shards": len({str(s.index) for s in kernel.addressable_shards}),
            "advantages": np.asarray(prepared["advantages"]).tolist()}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    print(json.dumps({m: main(m, out_dir) for m in sys.argv[2:]}))
