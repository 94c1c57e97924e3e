"""Greedy tokens and logprobs of the engine on one device and on an 8-device FSDP x TP mesh.

Used by test_engine_sharding.py in a subprocess with 8 fake CPU devices.
usage: python -m tests.serve.sharding_worker <run_dir>; prints {"single": ..., "fsdp_tp": ...}.
"""

import json
import sys

from llm.parallel.mesh import make_mesh
from llm.runs import load_run
from llm.serve.engine import Engine, EngineConfig, SamplingParams

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
         ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))


def run_engine(run_dir: str, mesh=None, rules=None) -> dict:
    run = load_run(run_dir, mesh=mesh, rules=rules)
    engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer,
                    EngineConfig(slots=4, chunk_size=16, min_chunk=16, max_context=64),
                    mesh=mesh, rules=rules)
    prompts = [run.tokenizer.encode(t) for t in ("def f(x):", "import os\nimport sys\n" * 2,
                                                  "class A:")]
    reqs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, logprobs=1,
                                                   echo=True, ignore_eos=True))
    sharded = str(next(iter(run.params["embed"].values())).sharding)
    return {"tokens": [r.output for r in reqs], "sharding": sharded,
            "logprobs": [[e.logprob for e in r.prompt_logprobs + r.logprobs] for r in reqs]}


if __name__ == "__main__":
    run_dir = sys.argv[1]
    out = {"single": run_engine(run_dir),
           "fsdp_tp": run_engine(run_dir, make_mesh(data=1, fsdp=4, tensor=2), RULES)}
    print(json.dumps(out))
