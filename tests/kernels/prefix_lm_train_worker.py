"""5 training steps of a tiny decoder on prefix_lm batches, with attention_impl xla and pallas
(and xla on the same batches minus the `prefix` field, as a control: plain causal attention,
same loss mask). Prints {name: losses} as JSON.

The batches are `tests.train.sharding_worker`'s learnable rows (two packed documents per row)
passed through the prefix_lm objective's own post-pack step, so `batch["prefix"]` is exactly
what training with `get_objective.name="prefix_lm"` feeds the model.
usage: python -m tests.kernels.prefix_lm_train_worker
"""

import json

import numpy as np

from llm.data.objectives import get_objective
from tests.train import sharding_worker

_next_token_batch = sharding_worker.synthetic_batch


def prefix_lm_batch(step: int) -> dict:
    rows = _next_token_batch(step)
    post_pack = get_objective("prefix_lm").post_pack
    rng = np.random.default_rng(1000 + step)
    out = [post_pack({"targets": rows["targets"][b], "targets_segment_ids": rows["segment_ids"][b],
                      "targets_positions": rows["positions"][b]}, rng)
           for b in range(len(rows["targets"]))]
    return {key: np.stack([row[key] for row in out]) for key in out[0]}


def causal_batch(step: int) -> dict:
    return {k: v for k, v in prefix_lm_batch(step).items() if k != "prefix"}


def losses(impl: str, prefix: bool) -> list[float]:
    sharding_worker.synthetic_batch = prefix_lm_batch if prefix else causal_batch
    return sharding_worker.main("single", 1, impl)


if __name__ == "__main__":
    batch = prefix_lm_batch(0)
    print(json.dumps({"xla": losses("xla", True), "pallas": losses("pallas", True),
                      "xla_no_prefix": losses("xla", False),
                      "prefix_fraction": float(batch["prefix"].mean())}))
