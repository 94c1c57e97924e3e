"""Task names and paths -> runnable tasks (what `experiments.evaluate --tasks` accepts).

    probes                     the prompt-injection / jailbreak probe suite (shipped)
    counterfactual             the counterfactual generation gap (shipped term lists)
    memorization               canary exposure and verbatim extraction (llm/eval/memorization.py)
    <format>=<path>            a published file read by llm/eval/readers.py, e.g.
                               hellaswag=/data/hellaswag_val.jsonl, bbq=/data/BBQ/data
    <path>.yaml                a native task spec (llm/eval/tasks.py)
    robustness:<task>          perturbation robustness of a multiple-choice <task> (either form)

Bias formats (crows_pairs, bbq, stereoset) run their own scoring (llm/eval/bias.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from llm.config import ConfigError
from llm.eval import adversarial, bias
from llm.eval.readers import BIAS_FORMATS, READERS
from llm.eval.tasks import TaskSpec, evaluate_spec, load_spec

BUILTIN = ("probes", "counterfactual", "memorization")


@dataclasses.dataclass(frozen=True)
class Task:
    """name: the file stem of runs/X/eval/<name>.json. run(lm) -> {"metrics", "samples", ...}."""

    name: str
    kind: str
    run: Callable


def valid_names() -> str:
    return (f"{', '.join(BUILTIN)}, <format>=<path> with format one of "
            f"{', '.join(sorted(READERS))}, a task .yaml path, or robustness:<task>")


def resolve(arg: str, probe_files: tuple[str, ...] = ()) -> Task:
    """A Task for one --tasks entry; ConfigError listing the valid names otherwise."""
    arg = arg.strip()
    if arg == "probes":
        return Task("probes", "probes", lambda lm: adversarial.probes(lm, probe_files))
    if arg == "counterfactual":
        return Task("counterfactual", "counterfactual", bias.counterfactual)
    if arg == "memorization":  # canary exposure + verbatim extraction (llm/eval/memorization.py)
        from llm.eval import memorization
        return Task("memorization", "memorization", memorization.task_result)
    if arg.startswith("robustness:"):
        inner = _spec(arg[len("robustness:"):])
        if inner is None:
            raise ConfigError(f"robustness:{arg[11:]!r} needs a multiple-choice task "
                              f"(a .yaml or <format>=<path>); valid: {valid_names()}.")
        return Task(f"robustness_{inner.name}", "robustness",
                    lambda lm: adversarial.robustness(lm, inner))
    if "=" in arg:
        fmt, path = arg.split("=", 1)
        if fmt in BIAS_FORMATS:
            if not os.path.exists(path):
                raise ConfigError(f"task {fmt}: {path!r} does not exist.")
            scorer = {"crows_pairs": bias.crows_pairs, "bbq": bias.bbq,
                      "stereoset": bias.stereoset}[fmt]
            return Task(fmt, fmt, lambda lm: scorer(lm, READERS[fmt].read(path)))
    spec = _spec(arg)
    if spec is None:
        raise ConfigError(f"unknown task {arg!r}; valid: {valid_names()}.")
    return Task(spec.name, spec.output_type, lambda lm: evaluate_spec(lm, spec))


def _spec(arg: str) -> TaskSpec | None:
    if arg.endswith((".yaml", ".yml")):
        if not os.path.isfile(arg):
            raise ConfigError(f"task spec {arg!r} does not exist.")
        return load_spec(arg)
    if "=" in arg:
        fmt, path = arg.split("=", 1)
        if fmt not in READERS or fmt in BIAS_FORMATS:
            return None
        if not os.path.exists(path):
            raise ConfigError(f"task {fmt}: {path!r} does not exist.")
        return TaskSpec(name=fmt, data=os.path.abspath(path), format=fmt,
                        **READERS[fmt].defaults)
    return None
