"""`curate()`: the gin-configured entry point (what `python -m tools.curate` calls)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import gin

from llm.data.curate import datasheet, workfile
from llm.data.curate import steps as registry
from llm.data.curate.plan import Plan, jsonable
from llm.data.curate.process import RunOptions
from llm.data.curate.readers import ReadLimits, plan_units
from llm.data.curate.records import CurationError

DEFAULT_SOURCES = ({"kind": "embedded"},)


@gin.configurable
def run_options(sample_size: int = 100, write_jsonl: bool = True,
                write_array_record: bool = True) -> RunOptions:
    """Gin: removed documents kept per reason under removed/, and which output formats."""
    return RunOptions(sample_size=sample_size, limits=ReadLimits(), write_jsonl=write_jsonl,
                      write_array_record=write_array_record)


def make_plan(sources, step_names, out_dir: str, options: RunOptions | None = None) -> Plan:
    """Expand sources and steps (with their gin bindings) into a Plan."""
    options = options or run_options()
    units = plan_units(list(sources), options.limits)
    segments = registry.build(step_names)
    return Plan(tuple(units), tuple(segments), tuple(step_names), out_dir, options)


def fingerprint(plan: Plan) -> str:
    """Hash of everything that determines the output: units, steps, gin bindings, limits."""
    blob = json.dumps({"units": [repr(u) for u in plan.units], "steps": plan.step_names,
                       "gin": gin.config_str(), "options": repr(plan.options)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_dirs(plan: Plan, fp: str, restart: bool) -> None:
    """Create out/work dirs; refuse to resume a work dir made by a different config or written
    in another work-file format version."""
    fp_path = os.path.join(plan.work_dir, "fingerprint")
    stamp = f"{fp} format={workfile.VERSION}"
    if restart and os.path.exists(plan.out_dir):
        for sub in ("_work", "kept", "removed"):
            shutil.rmtree(os.path.join(plan.out_dir, sub), ignore_errors=True)
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            old = f.read().strip()
        old_fp, _, old_format = old.partition(" format=")
        if old_fp == fp and old_format != str(workfile.VERSION):
            raise CurationError(
                f"{plan.work_dir} was written in work-file format version "
                f"{old_format or '1 (pickles)'}; this version reads format {workfile.VERSION}. "
                "Pass --restart to discard it.")
        if old_fp != fp:
            raise CurationError(
                f"{plan.work_dir} holds a run with a different config (fingerprint {old}, now "
                f"{fp}). Pass --restart to discard it, or choose another --out_dir.")
    os.makedirs(plan.work_dir, exist_ok=True)
    with open(fp_path, "w") as f:
        f.write(stamp)


def finalize(plan: Plan, seg_stats: list[dict], summaries: dict, meta: dict) -> dict:
    """Accounting check, datasheet.{json,md}, removed/ samples. Returns the datasheet."""
    t = datasheet.totals(seg_stats)
    ds = datasheet.build(t, registry.step_order(list(plan.segments)), summaries, meta)
    datasheet.write(plan.out_dir, ds, t)
    return ds


@gin.configurable
def curate(out_dir: str = "runs/curated", sources=DEFAULT_SOURCES,
           steps: tuple[str, ...] | list[str] = registry.DEFAULT_STEPS, runner: str = "local",
           workers: int = 1, restart: bool = False, name: str = "curated corpus",
           recipe: str = "", beam_options: tuple[str, ...] = (), quiet: bool = False) -> dict:
    """Read `sources`, run `steps`, write kept shards, removed samples and the datasheet.

    out_dir: output directory (kept/, removed/, datasheet.*, _work/ for resumption).
    sources: list of source specs (see `readers`); default: the embedded stdlib corpus.
    steps: step names in order (see `steps.MAP_STEPS`, `steps.GLOBAL_STEPS`).
    runner: 'local' (multiprocessing) or 'beam' (Apache Beam; `beam_options` are its pipeline
      flags, default DirectRunner).
    workers: processes for the local runner.
    restart: discard a previous run's work dir instead of resuming it.
    """
    t0 = time.time()
    plan = make_plan(sources, steps, out_dir)
    fp = fingerprint(plan)
    prepare_dirs(plan, fp, restart)
    if runner == "local":
        from llm.data.curate.local import run_local

        seg_stats, summaries = run_local(plan, workers=workers, quiet=quiet)
    elif runner == "beam":
        from llm.data.curate.beam_runner import run_beam

        seg_stats, summaries = run_beam(plan, list(beam_options))
    else:
        raise CurationError(f"curate.runner={runner!r}; use 'local' or 'beam'.")
    meta = {"name": name, "recipe": recipe, "sources": jsonable(list(sources)),
            "steps": list(steps), "units": len(plan.units), "fingerprint": fp,
            "command": f"python -m tools.curate --gin_file={recipe}" if recipe else
            "python -m tools.curate", "purpose": "language-model pretraining corpus"}
    ds = finalize(plan, seg_stats, summaries, meta)
    run_info = {"runner": runner, "workers": workers, "seconds": round(time.time() - t0, 2),
                "resumed_units": summaries.get("_resumed_units", 0)}
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(run_info, f, indent=1)
    return ds
