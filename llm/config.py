"""Gin parsing with errors that name the bad binding and the valid choices.

Every experiment has working defaults: nothing is %gin.REQUIRED. A typo, an unquoted string or a
value of the wrong type fails at parse time, naming where it came from:

    unknown parameter 'dmodel' of ModelConfig. Did you mean 'd_model'? Valid parameters: ...
      (in --gin_param=ModelConfig.dmodel=64)
    TrainConfig.steps='100' is a str, but TrainConfig.steps takes an integer. Remove the quotes.

`ConfigError` (a bad setting) and `llm.data.sources.DataError` (bad data) are the errors an
experiment's command line turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import os
import re
import types
import typing
from collections.abc import Sequence

import gin
import gin.config

# Modules whose configurables any config may bind; imported before parsing so that a binding is
# checked against the complete registry. Experiments register theirs by being imported.
CONFIGURABLE_MODULES = (
    "llm.data.sources", "llm.data.objectives", "llm.data.tokenizer", "llm.data.pipeline",
    "llm.data.prepare", "llm.model.config", "llm.parallel.mesh", "llm.parallel.rules",
    "llm.train.optimizer", "llm.train.checkpoint", "llm.train.loop", "llm.train.metrics",
    "llm.train.lora",
    "llm.serve.sampler",
)


class ConfigError(ValueError):
    """A setting is invalid: an unknown binding, a value outside its choices or constraints, or
    settings that do not fit together. The message names the binding, the value and the fix."""


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


def _simple_types(hint) -> tuple[type, ...] | None:
    """The plain types a parameter annotation allows ((int,), (str, NoneType), ...), or None
    when it allows something this check does not model (callables, sequences, classes)."""
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else (hint,)
    out = []
    for m in members:
        if m is type(None) or m in (int, float, bool, str):
            out.append(m)
        else:
            return None
    return tuple(out)


def _type_name(allowed: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "True or False", str: "a quoted string",
             type(None): "None"}
    return " or ".join(names[t] for t in allowed)


def _accepts(allowed: tuple[type, ...], value) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return any(isinstance(value, t) for t in allowed)


_REFERENCES = (gin.config.ConfigurableReference, gin.config._UnknownConfigurableReference)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_binding_types() -> None:
    """Every bound literal has the type its parameter is annotated with (int, float, bool, str,
    optionally None). Catches `TrainConfig.steps='100'` at parse time instead of as a TypeError
    deep inside the optimizer."""
    for (_, selector), params in gin.config._CONFIG.items():
        configurable = gin.config._REGISTRY.get_match(selector)
        if configurable is None:
            continue
        fn = configurable.wrapped
        try:
            hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn)
                                          and not dataclasses.is_dataclass(fn) else fn)
        except Exception:  # an annotation that does not evaluate: nothing to check against
            continue
        for param, value in params.items():
            allowed = _simple_types(hints[param]) if param in hints else None
            if allowed is None or isinstance(value, _REFERENCES):
                continue
            if not _accepts(allowed, value):
                name = f"{configurable.name}.{param}"
                hint = f" Bind it to {_type_name(allowed)}."
                if isinstance(value, str) and _accepts(allowed, _literal(value)):
                    hint = f" Remove the quotes: {name}={value}."
                raise ConfigError(f"{name}={value!r} is a {type(value).__name__}, but {name} "
                                  f"takes {_type_name(allowed)}.{hint}")


def _syntax_error(e: SyntaxError, where: str) -> ConfigError:
    text = (e.text or "").strip()
    token = re.search(r"Failed to parse token '([^']*)'", str(e))
    if token:
        fix = (f"'{token.group(1)}' is not a Python literal or a gin reference; a string needs "
               f"quotes: {text.replace(token.group(1), repr(token.group(1)), 1)}")
    else:
        fix = str(e.msg).splitlines()[-1].strip()
    return ConfigError(f"cannot parse `{text}` ({where}): {fix}")


def parse_gin(files: Sequence[str] = (), bindings: Sequence[str] = (),
              skip_unknown: bool = False) -> None:
    """Parse gin files then bindings (later ones win), then check every bound literal's type.

    Raises ConfigError naming the source (the file and line, or the `--gin_param`), the bad
    binding and the valid choices.

    skip_unknown: ignore bindings of configurables that are not registered (for tools that read
    an experiment's config but only use part of it, like `tools.prepare_data`).
    """
    for module in CONFIGURABLE_MODULES:
        importlib.import_module(module)
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"gin file {f!r} does not exist (run from the repository root, or "
                              "pass a path to one of gin_configs/**/*.gin).")
    sources = [(True, f, f"in {f}") for f in files]
    sources += [(False, b, f"in --gin_param={b}") for b in bindings]
    for is_file, source, where in sources:
        try:
            if is_file:
                gin.parse_config_file(source, skip_unknown=skip_unknown)
            else:
                gin.parse_config(source, skip_unknown=skip_unknown)
        except SyntaxError as e:
            if e.filename:
                where = f"{e.filename}, line {e.lineno}"
            raise _syntax_error(e, where) from None
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{_explain(str(e).splitlines()[0])} ({where})") from None
    check_binding_types()
    gin.finalize()
