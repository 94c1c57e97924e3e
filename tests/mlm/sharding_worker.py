"""Train the encoder (BERT MLM rows) and the encoder-decoder (span-corruption rows) for 5 steps on
a given mesh; print the losses as JSON. Used by test_sharding.py in a subprocess with 8 fake CPU
devices.

usage: python -m tests.mlm.sharding_worker <model>:<mesh>...  model: encoder | encoder_decoder;
mesh: a gin file under gin_configs/mesh/ or 'single'.
"""

import json
import sys

import jax
import numpy as np

from llm.data import objectives
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.model.encoder_decoder import MODELS
from llm.train.loss import encoder_decoder_loss, encoder_loss
from llm.train.optimizer import make_optimizer
from llm.train.state import create_train_state
from llm.train.step import batch_sharding, jit_train_step
from tests.train.sharding_worker import configure

VOCAB = objectives.VocabInfo(size=128, extra_ids=16)
OBJECTIVE = {"encoder": "bert_mlm", "encoder_decoder": "span_corruption"}
LOSS = {"encoder": encoder_loss, "encoder_decoder": encoder_decoder_loss}


def batch(model: str, step: int, rows: int = 8, seq: int = 32) -> dict:
    """Rows of the real objective over learnable token streams (counting upward)."""
    objective = objectives.get_objective(OBJECTIVE[model], VOCAB)
    raw = objective.lengths(seq)["targets"]
    rng = np.random.default_rng(step)
    out = []
    for _ in range(rows):
        start = rng.integers(0, 100)
        tokens = (3 + (start + np.arange(raw)) % 100).astype(np.int32)
        seg = np.where(np.arange(raw) < raw // 2, 1, 2).astype(np.int32)
        pos = np.where(seg == 1, np.arange(raw), np.arange(raw) - raw // 2).astype(np.int32)
        out.append(objective.post_pack({"targets": tokens, "targets_segment_ids": seg,
                                        "targets_positions": pos}, rng))
    return {k: np.stack([r[k] for r in out]) for k in out[0]}


def main(model: str, mesh_file: str) -> list[float]:
    mesh, rules = configure(mesh_file)
    cfg = ModelConfig(vocab_size=VOCAB.size, d_model=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, mlp_dim=128)
    module = MODELS[model]
    graphdef, abstract_params, axes = transformer.abstract(cfg, module)
    tx, schedule = make_optimizer(total_steps=5)
    state, shardings = create_train_state(lambda k: transformer.init(cfg, k, module)[1],
                                          abstract_params, axes, tx, mesh, rules, seed=0)
    step = jit_train_step(shardings, mesh, rules, loss_fn=LOSS[model](graphdef), tx=tx,
                          schedule=schedule)
    losses = []
    for i in range(5):
        state, metrics = step(state, jax.device_put(batch(model, i), batch_sharding(mesh, rules)))
        losses.append(float(metrics["loss"]))
    if "fsdp" in mesh_file or "tp" in mesh_file:  # the rule set really split the new weights
        kernel = (state.params["head_transform"]["kernel"] if model == "encoder" else
                  state.params["decoder_layer_0"]["cross"]["q"]["kernel"])
        if len({str(s.index) for s in kernel.addressable_shards}) < 2:
            raise SystemExit(f"{model} on {mesh_file}: new weights are not sharded")
    return losses


if __name__ == "__main__":
    results = {}
    for config in sys.argv[1:]:
        model, _, mesh = config.partition(":")
        results[config] = main(model, mesh)
    print(json.dumps(results))
