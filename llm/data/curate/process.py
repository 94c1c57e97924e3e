"""Per-unit processing shared by the local and the Beam runner, and the run statistics.

`run_segment` pushes one unit's documents through a segment (a global step's apply, then map
steps) and returns the survivors plus a statistics dict. Statistics are plain JSON and merge by
addition (`merge_stats`), so units can be processed anywhere, in any order.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator

from llm.data.curate.readers import ReadLimits, Unit, read_unit
from llm.data.curate.records import Rejected, ordinal, sample_of
from llm.data.curate.steps import Segment
from llm.data.sources import Document


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Settings every unit task needs (picklable, sent to workers)."""

    sample_size: int = 100  # removed documents kept per (step, reason) under removed/
    limits: ReadLimits = dataclasses.field(default_factory=ReadLimits)
    write_jsonl: bool = True
    write_array_record: bool = True


def new_stats() -> dict:
    return {"input": 0, "removed": {}, "changes": {}, "copies": 0, "kept": 0, "samples": {},
            "composition": {}}


def _remove(stats: dict, step: str, reason: str, o: int, doc_id: str, source: str, text: str,
            k: int) -> None:
    r = stats["removed"].setdefault(step, {})
    r[reason] = r.get(reason, 0) + 1
    s = stats["samples"].setdefault(f"{step}/{reason}", [])
    if len(s) < k:
        s.append([o, doc_id, source, sample_of(text)])


def _change(stats: dict, step: str, counts: dict) -> None:
    c = stats["changes"].setdefault(step, {})
    for key, v in counts.items():
        c[key] = c.get(key, 0) + v


def _one(r, step: str, o: int, doc: Document, out: list, stats: dict, k: int) -> None:
    """Record one step's result for one document; survivors are appended to `out`."""
    if isinstance(r, str):
        _remove(stats, step, r, o, doc.id, doc.source, doc.text, k)
    elif isinstance(r, tuple):
        _change(stats, step, r[1])
        out.append((o, r[0]))
    elif isinstance(r, list):
        stats["copies"] += len(r) - 1
        _change(stats, step, {"copies_added": len(r) - 1})
        out.extend((o, d) for d in r)
    else:
        out.append((o, r))


def read_records(unit_index: int, unit: Unit, limits: ReadLimits, stats: dict, k: int
                 ) -> Iterator[tuple[int, Document]]:
    """Stream a unit's documents; rejections are counted under the `read` step."""
    for i, rec in enumerate(read_unit(unit, limits)):
        o = ordinal(unit_index, i)
        stats["input"] += 1
        if isinstance(rec, Rejected):
            _remove(stats, "read", rec.reason, o, rec.id, rec.source, rec.sample, k)
        else:
            yield o, rec


def run_segment(docs: Iterable[tuple[int, Document]], segment: Segment, state, opts: RunOptions,
                stats: dict) -> Iterator[tuple[int, Document]]:
    """Stream one unit through one segment (global apply, then map steps), a document at a
    time: memory is one document (plus its balance copies), whatever the unit's size."""
    k = opts.sample_size
    chain: list[tuple[str, Callable]] = []
    if segment.global_step is not None:
        g = segment.global_step
        chain.append((g.name, lambda o, d, g=g: g.apply(o, d, state)))
    for name, fn in segment.map_steps:
        chain.append((name, lambda o, d, fn=fn: fn(d)))
    for o, doc in docs:
        items = [(o, doc)]
        for name, fn in chain:
            nxt: list = []
            for oo, dd in items:
                _one(fn(oo, dd), name, oo, dd, nxt, stats, k)
            items = nxt
            if not items:
                break
        for item in items:
            stats["kept"] += 1
            yield item


def composition(items: list[tuple[int, Document]], stats: dict) -> None:
    """Counts of kept documents per source/domain/language: [documents, words, characters]."""
    comp = stats["composition"]
    for _, d in items:
        words = len(d.text.split())
        for field in ("source", "domain", "language"):
            v = d.source if field == "source" else str(d.metadata.get(field, "unknown"))
            c = comp.setdefault(field, {}).setdefault(v, [0, 0, 0])
            c[0] += 1
            c[1] += words
            c[2] += len(d.text)


def _merge_counts(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _merge_counts(dst.setdefault(k, {}), v)
        elif isinstance(v, list):
            cur = dst.setdefault(k, [0] * len(v))
            for i, x in enumerate(v):
                cur[i] += x
        else:
            dst[k] = dst.get(k, 0) + v


def merge_into(acc: dict, s: dict, sample_size: int) -> dict:
    """Add statistics `s` into `acc` (in place); samples keep the `sample_size` lowest ordinals,
    so an accumulator stays small however many units are merged into it."""
    for key in ("input", "copies", "kept"):
        acc[key] += s.get(key, 0)
    for key in ("removed", "changes", "composition"):
        _merge_counts(acc[key], s.get(key, {}))
    for key, rows in s.get("samples", {}).items():
        merged = acc["samples"].get(key, []) + list(rows)
        acc["samples"][key] = sorted(merged, key=lambda r: r[0])[:sample_size]
    return acc


def merge_stats(all_stats: Iterable[dict], sample_size: int) -> dict:
    """Sum the statistics of many units (streaming; see `merge_into`)."""
    out = new_stats()
    for s in all_stats:
        merge_into(out, s, sample_size)
    return out


def record_json(doc: Document) -> dict:
    """The output record of a kept document."""
    return {"id": doc.id, "text": doc.text, "source": doc.source, "metadata": doc.metadata}


def write_unit_outputs(items: Iterable[tuple[int, Document]], base: str, opts: RunOptions,
                       stats: dict) -> list[str]:
    """Stream kept documents to `<base>.jsonl.gz` and `<base>.array_record` (atomically, via
    temporary files), counting the composition. Writes nothing for a unit with no documents.

    Bytes are deterministic (gzip mtime 0, no file name), so runners can be compared by hash.
    Returns the written paths.
    """
    tmp = f"{base}.tmp-{os.getpid()}"
    gz_file = gz = writer = None
    n = 0
    try:
        for _, d in items:
            if n == 0:
                if opts.write_jsonl:
                    gz_file = open(tmp + ".jsonl.gz", "wb")  # noqa: SIM115 - closed below
                    gz = gzip.GzipFile(filename="", mode="wb", fileobj=gz_file, mtime=0)
                if opts.write_array_record:
                    from array_record.python.array_record_module import ArrayRecordWriter

                    writer = ArrayRecordWriter(tmp + ".array_record", "group_size:1")
            n += 1
            composition([(0, d)], stats)
            line = json.dumps(record_json(d), ensure_ascii=False, sort_keys=True).encode(
                "utf-8", "surrogatepass")
            if gz is not None:
                gz.write(line + b"\n")
            if writer is not None:
                writer.write(line)
    finally:
        if gz is not None:
            gz.close()
            gz_file.close()
        if writer is not None:
            writer.close()
    paths = []
    for suffix, on in ((".jsonl.gz", opts.write_jsonl), (".array_record", opts.write_array_record)):
        if n and on:
            os.replace(tmp + suffix, base + suffix)
            paths.append(base + suffix)
    return paths
