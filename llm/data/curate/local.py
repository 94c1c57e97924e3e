"""The in-process runner: multiprocessing over units, streaming, resumable, with progress bars.

Memory: one unit per worker at a time, plus the global steps' compact state (16 bytes per
document per MinHash band, walked one band at a time). Every unit's result is written
atomically under `<work_dir>/`; rerunning the same command with the same work dir skips every
finished unit of every stage (including MinHash signatures), so a killed run resumes where it
stopped. Output is independent of `workers`: units are independent and global steps order by
ordinal.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from llm.data.curate import process, workfile
from llm.data.curate.plan import Plan
from llm.data.sources import Document

_CTX: dict = {}


def _init(ctx: dict) -> None:
    _CTX.clear()
    _CTX.update(ctx)


def atomic_write(path: str, data: bytes) -> None:
    """Write a file so that it either exists complete or not at all."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


CHUNK_DOCS = 1000          # documents per chunk in stage files
CHUNK_CHARS = 32 << 20     # ... or fewer, once this many characters are buffered


def _stage_path(plan: Plan, k: int, u: int) -> str:
    return os.path.join(plan.work_dir, f"stage{k}", f"u{u:06d}.msgpack")


def _analyze_dir(plan: Plan, k: int) -> str:
    return os.path.join(plan.work_dir, f"stage{k}.{plan.segments[k].global_step.name}")


def chunks(items: Iterable[tuple[int, Document]]) -> Iterator[list[tuple[int, Document]]]:
    """Group a document stream into bounded chunks."""
    buf: list = []
    size = 0
    for it in items:
        buf.append(it)
        size += len(it[1].text)
        if len(buf) >= CHUNK_DOCS or size >= CHUNK_CHARS:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def write_stage(path: str, items: Iterable[tuple[int, Document]]) -> None:
    """Stream documents to a stage file (a versioned msgpack stream of chunks), atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        workfile.write_stream(f, chunks(items))
    os.replace(tmp, path)


def read_stage(path: str) -> Iterator[list[tuple[int, Document]]]:
    """The chunks of a stage file."""
    for chunk in workfile.read_stream(path):
        yield [tuple(it) for it in chunk]


def _segment_task(u: int) -> tuple[int, dict, bool]:
    plan: Plan = _CTX["plan"]
    k: int = _CTX["k"]
    stats_path = _stage_path(plan, k, u) + ".stats"
    if os.path.exists(stats_path):
        return u, workfile.load(stats_path), True
    stats = process.new_stats()
    opts = plan.options
    if k == 0:
        docs = process.read_records(u, plan.units[u], opts.limits, stats, opts.sample_size)
    else:
        docs = (it for chunk in read_stage(_stage_path(plan, k - 1, u)) for it in chunk)
    items = process.run_segment(docs, plan.segments[k], _CTX.get("state"), opts, stats)
    if k == len(plan.segments) - 1:
        process.write_unit_outputs(items, os.path.join(plan.out_dir, "kept", f"part-{u:06d}"),
                                   opts, stats)
    else:
        write_stage(_stage_path(plan, k, u), items)
    atomic_write(stats_path, workfile.dumps(stats))
    return u, stats, False


def _analyze_task(u: int) -> tuple[int, bool]:
    """Analyze one unit chunk by chunk; `u.done` marks it finished (resume skips it)."""
    plan: Plan = _CTX["plan"]
    k: int = _CTX["k"]
    d = _analyze_dir(plan, k)
    done = os.path.join(d, f"u{u:06d}.done")
    if os.path.exists(done):
        return u, True
    analyze = plan.segments[k].global_step.analyze
    for c, chunk in enumerate(read_stage(_stage_path(plan, k - 1, u))):
        partial = analyze(chunk)
        path = os.path.join(d, f"u{u:06d}.c{c:05d}")
        if isinstance(partial, np.ndarray):
            tmp = f"{path}.tmp-{os.getpid()}.npy"
            np.save(tmp, partial)
            os.replace(tmp, path + ".npy")
        else:
            atomic_write(path + ".msgpack", workfile.dumps(partial))
    atomic_write(done, b"")
    return u, False


def _load_partials(d: str) -> list[tuple[tuple[int, int], object]]:
    """((unit, chunk), partial) for every finished chunk; arrays are memory-mapped."""
    out = []
    for name in sorted(os.listdir(d)):
        if ".tmp-" in name or not name.endswith((".npy", ".msgpack")):
            continue
        u, c = int(name[1:7]), int(name[9:14])
        path = os.path.join(d, name)
        if name.endswith(".npy"):
            out.append(((u, c), np.load(path, mmap_mode="r", allow_pickle=False)))
        else:
            out.append(((u, c), workfile.load(path)))
    return out


def _map(fn, items: list[int], ctx: dict, workers: int, desc: str, quiet: bool):
    bar = tqdm(total=len(items), desc=desc, unit="unit", disable=quiet, dynamic_ncols=True)
    if workers <= 1:
        _init(ctx)
        for x in items:
            yield fn(x)
            bar.update()
    else:
        # fork is cheapest, but forking a process that runs JAX or TensorFlow threads can deadlock
        threaded = any(m in sys.modules for m in ("jax", "tensorflow", "torch"))
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() and not threaded \
            else "spawn"
        with multiprocessing.get_context(method).Pool(workers, _init, (ctx,)) as pool:
            for r in pool.imap(fn, items, chunksize=1):
                yield r
                bar.update()
    bar.close()


def run_local(plan: Plan, workers: int = 1, quiet: bool = False) -> tuple[list[dict], dict]:
    """Run every stage; returns (merged stats per segment, {step: state summary})."""
    os.makedirs(os.path.join(plan.out_dir, "kept"), exist_ok=True)
    for k in range(len(plan.segments)):
        os.makedirs(os.path.join(plan.work_dir, f"stage{k}"), exist_ok=True)
    units = list(range(len(plan.units)))
    seg_stats, summaries = [], {}
    resumed = 0
    for k, seg in enumerate(plan.segments):
        state = None
        if seg.global_step is not None:
            g = seg.global_step
            os.makedirs(_analyze_dir(plan, k), exist_ok=True)
            state_path = os.path.join(plan.work_dir, f"stage{k}.{g.name}.state.msgpack")
            if os.path.exists(state_path):
                state = workfile.load(state_path)
            else:
                t = time.time()
                for _, skipped in _map(_analyze_task, units, {"plan": plan, "k": k}, workers,
                                       f"{g.name} (analyze)", quiet):
                    resumed += skipped
                partials = _load_partials(_analyze_dir(plan, k))
                state = g.combine(partials)
                atomic_write(state_path, workfile.dumps(state))
                if not quiet:
                    print(f"{g.name}: analyzed and combined {len(units)} units in "
                          f"{time.time() - t:.1f}s")
            summaries[g.name] = plan.summarize(g.name, state)
        names = ([seg.global_step.name] if seg.global_step else ["read"]) + \
            [n for n, _ in seg.map_steps]
        merged = process.new_stats()
        for _u, stats, skipped in _map(_segment_task, units, {"plan": plan, "k": k, "state": state},
                                      workers, " > ".join(names), quiet):
            process.merge_into(merged, stats, plan.options.sample_size)
            resumed += skipped
        seg_stats.append(merged)
    summaries["_resumed_units"] = resumed
    return seg_stats, summaries
