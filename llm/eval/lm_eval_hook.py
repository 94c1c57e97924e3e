"""Make the plain `lm_eval` command know `--model llm_jax`.

lm-eval 0.4.13 finds models only in its own MODEL_MAPPING (no plugin entry point). This module
installs a tiny import hook: when (and only when) a program imports `lm_eval.models` (lm-eval's
own models, which `get_model` imports on first use), the name `llm_jax` is registered right after
them as a lazy placeholder for `llm.eval.harness:LLMJax`, exactly as lm-eval registers its own
models. Registering any earlier would make the registry look populated, and `get_model` would
then never import lm-eval's own models. Nothing else is imported at start-up.

    python -m llm.eval.lm_eval_hook      # once per environment: writes llm_jax_lm_eval.pth

writes a one-line .pth file into the environment's site-packages that imports this module at
interpreter start-up (and does nothing if `llm` is not importable). tools/setup_env.sh runs it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import sysconfig

PTH_NAME = "llm_jax_lm_eval.pth"
PTH_LINE = ("import sys; exec('try:\\n    import llm.eval.lm_eval_hook\\n"
            "except Exception:\\n    pass')\n")
TARGET = "llm.eval.harness:LLMJax"


class RegistryHook(importlib.abc.MetaPathFinder):
    """Registers `llm_jax` right after lm-eval's `lm_eval.models` package is executed."""

    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_and_register(module):
            execute(module)
            from lm_eval.api.registry import model_registry

            if "llm_jax" not in model_registry:
                model_registry.register("llm_jax", target=TARGET)

        spec.loader.exec_module = exec_and_register
        return spec


def install_hook() -> None:
    if not any(isinstance(f, RegistryHook) for f in sys.meta_path):
        sys.meta_path.insert(0, RegistryHook())


def install_pth() -> str:
    """Write the .pth file into this interpreter's site-packages; returns its path."""
    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path, "w") as f:
        f.write(PTH_LINE)
    return path


install_hook()

if __name__ == "__main__":
    print(f"lm_eval_hook: wrote {install_pth()}")
