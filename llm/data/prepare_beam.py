"""`prepare` on Apache Beam: the same scan, tokenizer sample, layout and shard writer as the local
runner, so the shards and dataset.json are byte-identical (tests/data/test_prepare_beam.py).

Two pipelines, each one element per input file (`sources.Unit`), reshuffled over the workers:

1. scan: `prepare.scan_documents` per file -> per-file digests and counts (small, gathered) and
   the tokenizer sample (`Top.Smallest`, a combiner that scales out);
2. write: each file's documents are tokenized (the tokenizer model travels as bytes) and keyed by
   (split, domain, shard) with their position in that split and domain -- the file's offset from
   the scan plus its index in the file -- then `GroupByKey` brings each shard's documents to one
   worker, which sorts them and writes the shard with `prepare.ShardWriter`.

The driver trains SentencePiece between the two (on the sample, as the local runner does).
Results come back as JSON files under `<data_dir>/_prepare_beam/` (no pickles); shards are copied
through `apache_beam.io.filesystems.FileSystems`.

    python -m tools.prepare_data --data_dir=/mnt/data/web \
        --gin_param="corpus.name='curated'" --gin_param="curated.path='gs://bucket/curated'" \
        --gin_param="prepare.runner='beam'" \
        --gin_param="prepare.beam_options=['--runner=DataflowRunner', '--project=P', \
                     '--region=R', '--temp_location=gs://bucket/tmp']"

Beam's runner options are its own (`--direct_running_mode=multi_processing
--direct_num_workers=N` runs the DirectRunner in N processes; tests use that so every function
crosses a process boundary).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

from llm.data import prepare as prep
from llm.data import sources
from llm.data.sources import DataError

WORK_DIR = "_prepare_beam"


def _beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise DataError("prepare.runner='beam' needs Apache Beam, which is not installed: "
                        "`pip install -r requirements-beam.txt`, or use "
                        "prepare.runner='local'.") from None
    return beam


def _options(beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
    return PipelineOptions(args)


def _write_text(path: str, text: str) -> None:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(text.encode("utf-8", "surrogatepass"))


def _read_text(path: str) -> str:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read().decode("utf-8", "surrogatepass")


# -- pipeline 1: scan -------------------------------------------------------------------------

def _scan_unit(elem, routing: prep.Routing, seed: int, sample_docs: int):
    u, unit = elem
    return u, prep.scan_documents(sources.read_unit(unit), routing, seed, sample_docs)


def _write_scan(per_unit, sample, path: str) -> None:
    per_unit = sorted(per_unit)
    _write_text(path, json.dumps({"units": [{"digest": s["digest"], "counts": s["counts"]}
                                            for _, s in per_unit],
                                  "sample": [list(x) for x in sample]}, ensure_ascii=False))


def scan(units: Sequence[sources.Unit], routing: prep.Routing, seed: int, sample_docs: int,
         data_dir: str, beam_args: list[str]) -> list[dict]:
    """`prepare.scan_documents` of every unit, on Beam. The sample (already merged over all units)
    is returned in the first unit's entry; the others have an empty one."""
    beam = _beam()
    path = f"{data_dir}/{WORK_DIR}/scan.json"
    with beam.Pipeline(options=_options(beam_args)) as p:
        scans = (p | "units" >> beam.Create(list(enumerate(units)))
                 | "reshuffle" >> beam.Reshuffle()
                 | "scan" >> beam.Map(_scan_unit, routing, seed, sample_docs))
        small = scans | "counts" >> beam.Map(
            lambda e: (e[0], {"digest": e[1]["digest"], "counts": e[1]["counts"]}))
        sample = (scans | "candidates" >> beam.FlatMap(lambda e: [tuple(x) for x in e[1]["sample"]])
                  | "sample" >> beam.combiners.Top.Smallest(sample_docs))
        _ = (small | "gather" >> beam.combiners.ToList()
             | "write" >> beam.Map(_write_scan, beam.pvalue.AsSingleton(sample), path))
    result = json.loads(_read_text(path))
    out = [{"digest": s["digest"], "counts": s["counts"], "sample": []} for s in result["units"]]
    out[0]["sample"] = result["sample"]
    return out


# -- pipeline 2: tokenize and write -----------------------------------------------------------

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(model: bytes):
    """The tokenizer of these model bytes, loaded once per worker process."""
    from llm.data import tokenizer

    key = hashlib.sha256(model).hexdigest()
    if key not in _TOKENIZERS:
        path = os.path.join(tempfile.mkdtemp(prefix="prepare-beam-"), "tokenizer.model")
        with open(path, "wb") as f:
            f.write(model)
        _TOKENIZERS[key] = tokenizer.load_tokenizer(path)
    return _TOKENIZERS[key]


def _tokenize_unit(elem, routing: prep.Routing, layout: prep.Layout, model: bytes):
    from llm.data import tokenizer

    u, unit = elem
    tok = _tokenizer(model)
    seen: dict[tuple[str, str], int] = {}
    for chunk in prep._chunks((d,) for d in sources.read_unit(unit)):
        texts = [d.text for (d,) in chunk]
        for (doc,), tokens in zip(chunk, tokenizer.encode_documents(tok, texts)):
            split, domain = routing.route(doc)
            i = seen.get((split, domain), 0)
            seen[(split, domain)] = i + 1
            pos = layout.offsets[u][split][domain] + i
            k = layout.shard_of(split, domain, pos)
            yield (split, domain, k), (pos, tokens.tobytes(), doc.text)


def _write_shard(kv, layout: prep.Layout, vocab_size: int, out_dir: str):
    import numpy as np
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from llm.data import shards

    (split, domain, k), items = kv
    name = layout.shard_file(split, domain, k)
    with tempfile.TemporaryDirectory() as tmp:
        w = prep.ShardWriter(os.path.join(tmp, name), vocab_size, split == "validation")
        for _, tokens, text in sorted(items, key=lambda x: x[0]):
            w.add(np.frombuffer(tokens, shards.TOKEN_DTYPE), text)
        stats = w.close()
        with open(w.path, "rb") as src, FileSystems.create(
                f"{out_dir}/{name}", compression_type=CompressionTypes.UNCOMPRESSED) as dst:
            shutil.copyfileobj(src, dst)
    return [split, domain, k, stats]


def write(units: Sequence[sources.Unit], routing: prep.Routing, layout: prep.Layout,
          model_path: str, vocab_size: int, data_dir: str, beam_args: list[str]) -> dict:
    """Tokenizes every unit and writes every shard on Beam; {(split, domain, k): stats}."""
    beam = _beam()
    with open(model_path, "rb") as f:
        model = f.read()
    path = f"{data_dir}/{WORK_DIR}/shards.json"
    with beam.Pipeline(options=_options(beam_args)) as p:
        _ = (p | "units" >> beam.Create(list(enumerate(units)))
             | "reshuffle" >> beam.Reshuffle()
             | "tokenize" >> beam.FlatMap(_tokenize_unit, routing, layout, model)
             | "by_shard" >> beam.GroupByKey()
             | "write_shard" >> beam.Map(_write_shard, layout, vocab_size, data_dir)
             | "gather" >> beam.combiners.ToList()
             | "write_stats" >> beam.Map(lambda rows: _write_text(path, json.dumps(rows))))
    rows = json.loads(_read_text(path))
    if os.path.isdir(os.path.join(data_dir, WORK_DIR)):
        shutil.rmtree(os.path.join(data_dir, WORK_DIR))
    return {(s, d, k): st for s, d, k, st in rows}
