"""SFT, DPO and GRPO updates for one mesh in one process: the three sharding workers' `main`
(tests/posttrain/{sft,dpo,rl}_sharding_worker.py) one after the other, so a test compares a mesh
against one device with one subprocess per mesh rather than one per algorithm.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m tests.posttrain.posttrain_sharding_worker <out_dir> <mesh>
(mesh: a gin file under gin_configs/mesh/ or 'single'). Prints {"sft": ..., "dpo": ...,
"grpo": ...} as JSON; DPO and GRPO also save their updated params as <out_dir>/{dpo_,}<name>.npy.
"""

import dataclasses
import json
import sys

from tests.posttrain import dpo_sharding_worker, rl_sharding_worker, sft_sharding_worker

# FSDP alone splits the batch over all 8 devices, so every batch here has a multiple of 8 rows:
# 16 DPO pairs (reference pass in batches of 8), 16 GRPO rollout rows in minibatches of 8.
# GRPO's Adam step is 3e-4 (as the DPO worker's): an 8-way FSDP reduction adds ~1e-9 of order
# noise to gradients that are ~0, which Adam scales up to steps of about lr (at 1e-3, 2 of 82,240
# parameters ended 1.5e-5 apart).
dpo_sharding_worker.PAIRS = 16
RC = dataclasses.replace(rl_sharding_worker.RC, prompts_per_step=8)
MINIBATCHES = (list(range(0, 16, 2)), list(range(1, 16, 2)), list(range(8)))

if __name__ == "__main__":
    out_dir, mesh = sys.argv[1], sys.argv[2]
    print(json.dumps({"sft": sft_sharding_worker.main(mesh),
                      "dpo": dpo_sharding_worker.main(mesh, out_dir),
                      "grpo": rl_sharding_worker.main(mesh, out_dir, RC, MINIBATCHES, lr=3e-4)}))
