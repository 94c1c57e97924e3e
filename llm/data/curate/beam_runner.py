"""The Apache Beam runner: the same units, segments and statistics as the local runner.

Each unit is one Beam element `(unit, documents, stats)`; a segment is a `Map` over units. A
global step's combined state reaches the next segment as a singleton side input, built with
shuffles that scale out instead of gathering everything on one worker:
  * minhash_dedup: (band, band hash) -> ordinals `GroupByKey`; each bucket links its documents
    to its lowest ordinal; only these duplicate edges (distinct) meet on one worker, where
    union-find (`minhash.state_from_edges`, shared with the local runner) resolves clusters;
  * exact_dedup: hash -> ordinals `GroupByKey`; all but the lowest ordinal are removed;
  * boilerplate: `CombinePerKey` counts per (source, line hash) and documents per source;
  * balance (small state): `Map(analyze)` -> `ToList` -> `Map(combine)`.
Outputs are written through `apache_beam.io.filesystems.FileSystems`, so
`out_dir` may be a `gs://`, `s3://` or `hdfs://` path on Dataflow, Flink or Spark runners.

    python -m tools.curate --gin_file=gin_configs/data/web.gin \
        --gin_param="curate.runner='beam'" \
        --gin_param="curate.beam_options=['--runner=DataflowRunner', '--project=...', ...]"

Because every function here is the local runner's, the kept shards and the datasheet are
identical (tested with the DirectRunner).
"""

from __future__ import annotations

import os
import tempfile

from llm.data.curate import process, workfile
from llm.data.curate.plan import Plan
from llm.data.curate.records import CurationError


def _write(path: str, data: bytes) -> None:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    # UNCOMPRESSED: the bytes are already final (Beam would gzip `.gz` paths a second time)
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


def _seg0(u: int, plan: Plan):
    stats = process.new_stats()
    opts = plan.options
    docs = process.read_records(u, plan.units[u], opts.limits, stats, opts.sample_size)
    return _segment((u, docs, None), plan, 0, None, stats)


def _segment(elem, plan: Plan, k: int, state, stats: dict | None = None):
    u, docs, _ = elem
    stats = stats if stats is not None else process.new_stats()
    items = process.run_segment(docs, plan.segments[k], state, plan.options, stats)
    if k < len(plan.segments) - 1:
        return u, list(items), stats
    with tempfile.TemporaryDirectory() as tmp:  # same writer as the local runner, then copy
        for path in process.write_unit_outputs(items, os.path.join(tmp, f"part-{u:06d}"),
                                               plan.options, stats):
            with open(path, "rb") as f:
                _write(f"{plan.out_dir}/kept/{os.path.basename(path)}", f.read())
    return u, [], stats


def _combine(partials, g):
    return g.combine(sorted((((u, 0), p) for u, p in partials), key=lambda x: x[0]))


def _minhash_rows(e, g):
    """Tagged rows: ("band", ((band, hash), ordinal)) and ("keys", (ordinal, survivor keys))."""
    a = g.analyze(list(e[1]))
    bands = g.config.bands
    signed = a.view("int64")  # Beam's integer coder is signed 64-bit
    for row, srow in zip(a, signed):
        o = int(row[0])
        for b, h in enumerate(srow[1:1 + bands].tolist()):
            if h:
                yield "band", ((b, h), o)
        yield "keys", (o, tuple(srow[1 + bands:].tolist()))


def _bucket_edges(kv):
    ords = sorted(kv[1])
    return [(ords[0], o) for o in ords[1:]]


def _bucket_collisions(kv):
    ords = kv[1]
    return [(o, len(ords) - 1) for o in ords] if len(ords) > 1 else []


def _minhash_state(edges, docs, keys, cent, cfg):
    import numpy as np

    from llm.data.curate import minhash

    edges = sorted(edges)
    src = np.array([a for a, _ in edges], np.uint64)
    dst = np.array([b for _, b in edges], np.uint64)
    keys = sorted(keys)
    ords = np.array([o for o, _ in keys], np.uint64)
    cols = np.array([k for _, k in keys], np.int64).reshape(len(keys), 3).view(np.uint64)
    c = np.array([cent.get(int(o), 0) for o in ords], np.int64)
    return minhash.state_from_edges(src, dst, docs, ords, cols, c, cfg)


def _exact_removed(removed):
    import numpy as np

    return np.array(sorted(removed), np.uint64)


def _boilerplate_state(lines, docs_per_source):
    import numpy as np

    out = {s: [] for s in docs_per_source}
    for s, h in lines:
        out[s].append(h)
    return {s: np.sort(np.array(hs, np.int64).view(np.uint64)) for s, hs in out.items()}


def _global_state(beam, cur, g, k: int):
    """The combined state of global step `g` as a PCollection with one element."""
    name = f"{k}_{g.name}"
    if g.name == "minhash_dedup":
        tagged = cur | f"bands{name}" >> beam.FlatMap(_minhash_rows, g)
        rows = (tagged | f"band_rows{name}" >> beam.Filter(lambda t: t[0] == "band")
                | f"untag{name}" >> beam.Map(lambda t: t[1]))
        keys = (tagged | f"key_rows{name}" >> beam.Filter(lambda t: t[0] == "keys")
                | f"untag_keys{name}" >> beam.Map(lambda t: t[1])
                | f"gather_keys{name}" >> beam.combiners.ToList())
        docs = (cur | f"count{name}" >> beam.Map(lambda e: len(e[1]))
                | f"docs{name}" >> beam.CombineGlobally(sum))
        buckets = rows | f"buckets{name}" >> beam.GroupByKey()
        cent = (buckets | f"collisions{name}" >> beam.FlatMap(_bucket_collisions)
                | f"centrality{name}" >> beam.CombinePerKey(sum))
        return (buckets
                | f"edges{name}" >> beam.FlatMap(_bucket_edges)
                | f"distinct{name}" >> beam.Distinct()
                | f"gather{name}" >> beam.combiners.ToList()
                | f"union_find{name}" >> beam.Map(
                    _minhash_state, beam.pvalue.AsSingleton(docs), beam.pvalue.AsSingleton(keys),
                    beam.pvalue.AsDict(cent), g.config))
    if g.name == "exact_dedup":
        return (cur | f"hash{name}" >> beam.FlatMap(
                    lambda e: ((h, o) for h, o in g.analyze(list(e[1])).view("int64").tolist()))
                | f"groups{name}" >> beam.GroupByKey()
                | f"later_copies{name}" >> beam.FlatMap(lambda kv: sorted(kv[1])[1:])
                | f"gather{name}" >> beam.combiners.ToList()
                | f"removed{name}" >> beam.Map(_exact_removed))
    if g.name == "boilerplate":
        cfg = g.config
        parts = cur | f"lines{name}" >> beam.Map(lambda e: g.analyze(list(e[1])))
        docs = (parts | f"docs{name}" >> beam.FlatMap(lambda a: ((s, n) for s, (n, _) in
                                                                  a.items()))
                | f"docs_sum{name}" >> beam.CombinePerKey(sum))
        return (parts | f"hashes{name}" >> beam.FlatMap(
                    lambda a: (((s, h), 1) for s, (_, hs) in a.items()
                               for h in hs.view("int64").tolist()))
                | f"count{name}" >> beam.CombinePerKey(sum)
                | f"frequent{name}" >> beam.Filter(
                    lambda kv, d: kv[1] >= max(cfg.min_docs, cfg.min_fraction * d[kv[0][0]]),
                    beam.pvalue.AsDict(docs))
                | f"keys{name}" >> beam.Map(lambda kv: kv[0])
                | f"gather{name}" >> beam.combiners.ToList()
                | f"state{name}" >> beam.Map(_boilerplate_state, beam.pvalue.AsDict(docs)))
    return (cur | f"analyze{name}" >> beam.Map(lambda e: (e[0], g.analyze(list(e[1]))))
            | f"collect{name}" >> beam.combiners.ToList()
            | f"combine{name}" >> beam.Map(_combine, g))


def _stats_combine_fn(n_segments: int, sample_size: int):
    import apache_beam as beam

    class StatsCombine(beam.CombineFn):
        """Merges (segment, unit stats) into one bounded stats dict per segment."""

        def create_accumulator(self):
            return [process.new_stats() for _ in range(n_segments)]

        def add_input(self, acc, elem):
            k, s = elem
            process.merge_into(acc[k], s, sample_size)
            return acc

        def merge_accumulators(self, accs):
            accs = list(accs)
            out = accs[0]
            for a in accs[1:]:
                for k in range(n_segments):
                    process.merge_into(out[k], a[k], sample_size)
            return out

        def extract_output(self, acc):
            return acc

    return StatsCombine()


def run_beam(plan: Plan, beam_args: list[str] | None = None) -> tuple[list[dict], dict]:
    """Run the plan on Beam; returns (merged stats per segment, {step: state summary})."""
    try:
        import apache_beam as beam
    except ImportError:
        raise CurationError("curate.runner='beam' needs Apache Beam, which is not installed. "
                            "Install it as shown in docs/curation.md (Dependencies), or use "
                            "curate.runner='local'.") from None
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args or [])
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
    stats_path = f"{plan.work_dir}/beam_stats.pkl"
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        cur = (p | "units" >> beam.Create(list(range(len(plan.units))))
               | "reshuffle" >> beam.Reshuffle()
               | "segment0" >> beam.Map(_seg0, plan))
        seg_stats = [cur | "stats0" >> beam.Map(lambda e: (0, e[2]))]
        summaries = []
        for k in range(1, len(plan.segments)):
            g = plan.segments[k].global_step
            state = _global_state(beam, cur, g, k)
            summaries.append(state | f"summary{k}" >> beam.Map(
                lambda s, name=g.name: (name, Plan.summarize(name, s))))
            cur = cur | f"segment{k}" >> beam.Map(_segment, plan, k,
                                                  beam.pvalue.AsSingleton(state))
            seg_stats.append(cur | f"stats{k}" >> beam.Map(lambda e, k=k: (k, e[2])))
        stats = (seg_stats | "all_stats" >> beam.Flatten()) if len(seg_stats) > 1 else seg_stats[0]
        summ = (summaries | "all_summaries" >> beam.Flatten()) if summaries else \
            (p | "no_summaries" >> beam.Create([]))
        gathered = stats | "gather_stats" >> beam.CombineGlobally(
            _stats_combine_fn(len(plan.segments), plan.options.sample_size))
        gathered_s = summ | "gather_summaries" >> beam.combiners.ToList()
        _ = gathered | "write_stats" >> beam.Map(
            lambda st, sm: _write(stats_path, workfile.dumps((st, sm))),
            beam.pvalue.AsSingleton(gathered_s))
    from apache_beam.io.filesystem import CompressionTypes

    with FileSystems.open(stats_path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        merged, summ_list = workfile.loads(f.read(), stats_path)
    return merged, dict(summ_list)
