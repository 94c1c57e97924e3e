"""Gin parsing with errors that name the bad binding and the valid choices.

Every experiment has working defaults: nothing is %gin.REQUIRED. A typo fails at parse time:

    ConfigError: unknown parameter 'dmodel' of ModelConfig (gin_configs/x.gin);
    valid: activation, attention_impl, d_model, ...
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Sequence

import gin
import gin.config

# Modules whose configurables any config may bind; imported before parsing so that a binding is
# checked against the complete registry. Experiments register theirs by being imported.
CONFIGURABLE_MODULES = (
    "llm.data.sources", "llm.data.objectives", "llm.data.tokenizer", "llm.data.pipeline",
    "llm.data.prepare", "llm.model.config", "llm.parallel.mesh", "llm.parallel.rules",
    "llm.train.optimizer", "llm.train.checkpoint", "llm.train.loop", "llm.train.metrics",
    "llm.serve.sampler",
)


class ConfigError(ValueError):
    """A gin file or binding does not match any configurable or parameter."""


def _configurables() -> dict[str, object]:
    out = {}
    for selector, cfg in gin.config._REGISTRY.items():
        out[selector.split(".")[-1]] = cfg.wrapped
    return out


def _explain(message: str) -> str:
    known = _configurables()
    m = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    if m:
        name, param = m.group(1).split(".")[-1], m.group(2)
        fn = known.get(name)
        params = sorted(inspect.signature(fn).parameters) if fn is not None else []
        close = difflib.get_close_matches(param, params, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (f"unknown parameter '{param}' of {name}.{hint} Valid parameters: "
                f"{', '.join(params)}.")
    m = re.search(r"No configurable matching '([\w.]+)'", message)
    if m:
        name = m.group(1)
        close = difflib.get_close_matches(name.split(".")[-1], sorted(known), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (f"unknown configurable '{name}'.{hint} Valid configurables: "
                f"{', '.join(sorted(known))}.")
    return message


def parse_gin(files: Sequence[str] = (), bindings: Sequence[str] = (),
              skip_unknown: bool = False) -> None:
    """Parse gin files then bindings (later ones win). Raises ConfigError with the valid choices.

    skip_unknown: ignore bindings of configurables that are not registered (for tools that read
    an experiment's config but only use part of it, like `tools.prepare_data`).
    """
    import importlib
    import os

    for module in CONFIGURABLE_MODULES:
        importlib.import_module(module)
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"gin file {f!r} does not exist (run from the repository root, or "
                              "pass a path to one of gin_configs/**/*.gin).")
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings),
                                            skip_unknown=skip_unknown)
    except (ValueError, KeyError) as e:
        where = f" (in {', '.join(files) or 'bindings'})"
        raise ConfigError(_explain(str(e).split("\n")[0]) + where) from None
