"""Score requests with a run's LanguageModel on one device and on meshes of 8 fake CPU devices;
print {config: [[loglikelihood...], [rolling...], [greedy text...]]} as JSON.

usage: python -m tests.eval.sharding_worker <run_dir> <config>...  (config: 'single' or a gin
file under gin_configs/mesh/). Used by test_sharding.py with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json
import sys

import gin
import jax

from llm.eval.lm import LanguageModel
from llm.parallel.mesh import make_mesh
from llm.parallel.rules import axis_rules

REQUESTS = [("def foo(x):\n    return", " x"), ("import os", "\nimport sys"), ("", "hello"),
            ("class A:", "\n    pass\n"), ("x = ", "1"), ("from email import", " utils")]
TEXTS = ["import os\nimport sys\n" * 12, "def f(x):\n    return x\n"]


def main(run_dir: str, config: str) -> list:
    gin.clear_config()
    if config == "single":
        mesh, rules = make_mesh(data=1, devices=jax.devices()[:1]), axis_rules()
    else:
        gin.parse_config_file(config)
        mesh, rules = make_mesh(), axis_rules()
    lm = LanguageModel.from_run_dir(run_dir, mesh=mesh, rules=rules, batch_size=5,
                                    progress=False)
    leaf = lm.run.params["embed"]["embedding"]
    return [[ll for ll, _ in lm.loglikelihood(REQUESTS)], lm.loglikelihood_rolling(TEXTS),
            lm.generate_until([(c, {"max_gen_toks": 4}) for c, _ in REQUESTS]),
            str(leaf.sharding.spec)]


if __name__ == "__main__":
    run_dir, *configs = sys.argv[1:]
    print(json.dumps({c: main(run_dir, c) for c in configs}))
