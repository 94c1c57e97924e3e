"""Three SFT steps (packed chat rows, loss on response tokens only) on one device and on 8 fake
devices; prints {mesh: {"losses": [...], "params": digest}} as JSON.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m tests.posttrain.sft_sharding_worker single gin_configs/mesh/fsdp_tp.gin ...
"""

import json
import sys

import jax
import numpy as np

from llm.model import transformer
from llm.model.config import ModelConfig
from llm.posttrain.chat_data import chat_dataset
from llm.train.loss import decoder_loss
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, jit_train_step
from tests.train.sharding_worker import configure


def examples(n: int = 40, vocab: int = 128) -> list[dict]:
    """Synthetic conversations: a prompt (no loss) then a response that repeats the prompt."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, vocab, rng.integers(3, 9))
        tokens = np.concatenate([prompt, prompt, [1]]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(prompt) + 1)])
        out.append({"targets": tokens, "loss_mask": mask.astype(np.float32)})
    return out


def main(mesh_file: str) -> dict:
    mesh, rules = configure(mesh_file)
    cfg = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=128, attention_impl="xla")
    graphdef, abstract_params, axes = transformer.abstract(cfg)
    tx, schedule = make_optimizer(total_steps=3)
    state, shardings = create_train_state(lambda k: transformer.init(cfg, k)[1], abstract_params,
                                          axes, tx, mesh, rules, seed=0)
    step = jit_train_step(shardings, mesh, rules, loss_fn=decoder_loss(graphdef), tx=tx,
                          schedule=schedule)
    kernel = state.params["layer_0"]["mlp"]["wi"]["kernel"]
    name = mesh_file.rsplit("/", 1)[-1].removesuffix(".gin")
    shards = len({str(s.index) for s in kernel.addressable_shards})
    if shards != {"single": 1, "fsdp": 8, "fsdp_tp": 8, "tp": 2}[name]:
        raise SystemExit(f"{name}: wi kernel has {shards} distinct shards")
    data = iter(chat_dataset(examples(), seq_len=32, global_batch_size=8, seed=0))
    losses = []
    for _ in range(3):
        state, metrics = step(state, jax.device_put(next(data), batch_sharding(mesh, rules)))
        losses.append(float(metrics["loss"]))
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state.params)]
    return {"losses": losses, "params": np.concatenate(leaves).tolist()[::97]}


if __name__ == "__main__":
    print(json.dumps({m: main(m) for m in sys.argv[1:]}))
