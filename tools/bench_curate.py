"""Benchmark: our curation blocks vs datatrove, rensa and Presidio, same corpus, same run.

Every figure is documents per CPU-second of one single-threaded process (process time, so the
figure is per core and insensitive to other load on the machine). Rows:

  filters (Gopher quality + Gopher repetition + C4, each with its published defaults, listed in the
  JSON under "conditions"):
    ours native      whitespace words (the shipped default)
    ours datatrove   `mode="datatrove"`: spaCy words, datatrove's rules (verdicts = datatrove's)
    datatrove        datatrove 0.10.1
    step-only rows time the filter calls on in-memory documents; end-to-end rows run the real
    pipelines from a JSONL file to written .jsonl.gz output (ours: `curate()` with one worker;
    datatrove: LocalPipelineExecutor, 1 task, 1 worker, JsonlReader ... JsonlWriter).
  MinHash (5-gram words, 14 bands x 8 rows = 112 permutations, 64-bit hashes on our and
  datatrove's side, 32-bit in rensa, whose API fixes them):
    ours in memory        analyze per 1000-doc unit + combine, arrays in memory
    ours pipeline         `curate(steps=["minhash_dedup"])`: read, stage files on disk, signatures
                          spilled as .npy, combine, apply, write (end to end)
    datatrove stages      signature, buckets, cluster stages with their files on disk (step-only,
                          documents already in memory for the signature stage)
    datatrove pipeline    the same plus JsonlReader and the MinhashDedupFilter + JsonlWriter stage
    rensa in memory       RMinHash.from_token_sets (Rust) on 5-gram word shingles built in Python,
                          RMinHashLSH(num_perm=112, num_bands=14), query_all, union-find
  PII: ours vs Presidio's pattern recognizers (presidio-analyzer with a blank spaCy English
  pipeline: no NER model is downloaded, so names/locations are out of scope) on the frozen PII set
  (tests/curate/eval_sets/pii.jsonl): recall per type both support, and sentences per CPU-second.

The side virtualenv (never .venv) holds datatrove, spaCy, rensa and presidio-analyzer:
    python3.11 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install "datatrove[processing]==0.10.1" spacy==3.8.18 rensa==0.5.0 \
        presidio-analyzer==2.2.366
then:
    python -m tools.bench_curate --venv /tmp/bench-venv --docs 4000 --out runs/bench_curate.json

Without --venv (or if the venv lacks a package) only the rows that can run are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time

_SYL = ["ka", "to", "mi", "ren", "sal", "vo", "dra", "len", "shu", "pe", "bor", "ti", "nax",
        "qui", "lo", "mar", "fen", "ul", "gri", "zo", "ber", "an", "es", "it", "on", "ha"]
_FRAMES = [
    "The {0} and the {1} have {2} with {3} near {4}.",
    "A {0} was {1} by the {2} of {3}, and it {4} again.",
    "Some {0} said that {1} {2} every {3} before the {4}.",
    "In the {0} of {1}, we {2} {3} because {4} matters.",
    "It is {0} to {1} a {2} when the {3} is {4}.",
    "Why would the {0} {1} {2} after {3} and {4}?",
]
TARGETS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3)


def make_corpus(n_docs: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int, float]]]:
    """Web-like documents (~300-700 words, lines of 1-4 sentences, some list/junk pages) and
    planted near-duplicate pairs (base, variant, target Jaccard)."""
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4)))
                    for _ in range(20000)})
    docs: list[str] = []
    pairs = []
    n_base = int(n_docs * 0.8)
    for i in range(n_base):
        lines = []
        for _ in range(rng.randint(10, 30)):
            k = rng.randint(1, 4)
            lines.append(" ".join(rng.choice(_FRAMES).format(*(rng.choice(vocab)
                                                               for _ in range(5)))
                                  for _ in range(k)))
        if i % 10 == 0:    # junk page: navigation lines and short fragments
            lines += [f"{rng.choice(vocab)} | {rng.choice(vocab)}" for _ in range(40)]
        docs.append("\n".join(lines))
    while len(docs) < n_docs:
        b = rng.randrange(n_base)
        t = TARGETS[len(pairs) % len(TARGETS)]
        q = (1 - t) / (1 + t) / 5 * 1.05
        var = "\n".join(" ".join(rng.choice(vocab) if rng.random() < q else w
                                 for w in line.split(" ")) for line in docs[b].split("\n"))
        pairs.append((b, len(docs), t))
        docs.append(var)
    return docs, pairs


def score(removed: set[int], pairs, sims) -> dict:
    """Recall on pairs with true Jaccard >= 0.8; precision = removed docs that are a planted
    variant of true Jaccard >= 0.7 (or whose base is removed because of it)."""
    true = [(b, v) for (b, v, _), s in zip(pairs, sims) if s >= 0.8]
    hit = sum(1 for b, v in true if (b in removed) != (v in removed))
    near = {d for (b, v, _), s in zip(pairs, sims) if s >= 0.7 for d in (b, v)}
    rates = {}
    for lo, hi in ((0.9, 1.01), (0.8, 0.9), (0.7, 0.8), (0.45, 0.7), (0.0, 0.45)):
        sel = [(b, v) for (b, v, _), s in zip(pairs, sims) if lo <= s < hi]
        if sel:
            rates[f"J[{lo},{min(hi, 1.0)})"] = round(
                sum(1 for b, v in sel if b in removed or v in removed) / len(sel), 3)
    return {"recall_j>=0.8": round(hit / max(len(true), 1), 4),
            "precision": round(sum(1 for d in removed if d in near) / max(len(removed), 1), 4),
            "removed": len(removed), "removal_rate_by_jaccard": rates}


def _filter_chain(mode: str):
    from llm.data.curate import quality

    return [quality.gopher_quality_step(mode=mode), quality.gopher_repetition_step(mode=mode),
            quality.c4_step(mode=mode)]


def bench_ours(docs: list[str], unit_size: int = 1000, repeat: int = 3) -> dict:
    """Step-only figures: filters (native and datatrove mode) and MinHash in memory."""
    from llm.data.curate import minhash
    from llm.data.sources import Document

    ds = [Document(str(i), t, "bench", {"domain": "web"}) for i, t in enumerate(docs)]
    out = {}
    for mode in ("native", "datatrove"):
        chain = _filter_chain(mode)
        chain[0](Document("w", "warm up text. " * 20, "w", {}))  # load spaCy outside the timing
        t0 = time.process_time()
        verdicts = []
        for d in ds:
            ok = True
            for f in chain:
                if isinstance(f(d), str):
                    ok = False
                    break
            verdicts.append(ok)
        out[f"filters_{mode}"] = {"s": time.process_time() - t0, "kept": sum(verdicts),
                                  "verdicts": verdicts}
    cfg = minhash.MinHashConfig()
    best = None
    for _ in range(repeat):   # the best of `repeat` runs: the machine is shared
        t0 = time.process_time()
        parts = [(u, minhash.analyze(list(enumerate(ds))[s:s + unit_size], cfg))
                 for u, s in enumerate(range(0, len(ds), unit_size))]
        t_sig = time.process_time() - t0
        state = minhash.combine(parts, cfg)
        t = time.process_time() - t0
        if best is None or t < best["s"]:
            best = {"s": t, "signature_s": t_sig, "removed": sorted(state["removed"].tolist())}
    out["minhash_memory"] = best
    return out


def bench_ours_e2e(corpus: str, n: int, tmp: str) -> dict:
    """End to end through `curate()` (one worker): read the JSONL, run the stages (stage files
    on disk), write kept .jsonl.gz. Process time of this process (workers=1 runs in it)."""
    import gzip

    import gin

    from llm.data.curate.run import curate

    out = {}
    for name, steps in (("filters_pipeline", ["gopher_quality", "gopher_repetition", "c4"]),
                        ("minhash_pipeline", ["minhash_dedup"])):
        gin.clear_config()
        gin.bind_parameter("run_options.write_array_record", False)
        d = os.path.join(tmp, name)
        t0 = time.process_time()
        curate(out_dir=d, sources=[{"kind": "jsonl", "path": corpus, "domain": "web"}],
               steps=steps, quiet=True, restart=True)
        dt = time.process_time() - t0
        kept = set()
        for f in sorted(os.listdir(os.path.join(d, "kept"))):
            if f.endswith(".jsonl.gz"):
                with gzip.open(os.path.join(d, "kept", f), "rt") as fh:
                    kept |= {int(json.loads(x)["id"].rsplit(":", 1)[1]) - 1 for x in fh}
        out[name] = {"s": dt, "kept": len(kept),
                     "removed": sorted(set(range(n)) - kept)}
    gin.clear_config()
    return out


_DATATROVE = textwrap.dedent("""
    import json, os, struct, sys, tempfile, time
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (C4QualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                                  MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    corpus = sys.argv[1]
    docs = [json.loads(l)["text"] for l in open(corpus)]
    mk = lambda: (Document(text=t, id=str(i)) for i, t in enumerate(docs))
    fs = [GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter()]
    for f in fs:  # warm up lazy tokenizers
        f.filter(Document(text="warm up text. " * 20, id="w"))
    t0 = time.process_time(); verdicts = []
    for d in mk():
        ok = True
        for f in fs:
            r = f.filter(d)
            if not (r is True or (isinstance(r, tuple) and r[0])):
                ok = False
                break
        verdicts.append(ok)
    t_filters = time.process_time() - t0
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8,
                        hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    tmp = tempfile.mkdtemp()
    t0 = time.process_time()
    MinhashDedupSignature(output_folder=f"{tmp}/sigs", config=cfg).run(mk(), 0, 1)
    t_sig = time.process_time() - t0
    for b in range(cfg.num_buckets):  # one task per bucket, as datatrove requires
        MinhashDedupBuckets(input_folder=f"{tmp}/sigs", output_folder=f"{tmp}/buckets",
                            config=cfg).run(None, b, cfg.num_buckets)
    MinhashDedupCluster(input_folder=f"{tmp}/buckets", output_folder=f"{tmp}/remove",
                        config=cfg).run(None, 0, 1)
    t_all = time.process_time() - t0
    removed = []
    p = f"{tmp}/remove/000000.remove"
    if os.path.exists(p):
        data = open(p, "rb").read()
        removed = list(struct.unpack(f"<{len(data) // 4}I", data))
    # end to end: JSONL in, .jsonl.gz out, LocalPipelineExecutor (1 task, 1 worker: in-process)
    src = os.path.dirname(corpus)
    reader = lambda: JsonlReader(src, glob_pattern=os.path.basename(corpus))
    t0 = time.process_time()
    LocalPipelineExecutor([reader(), *[type(f)() for f in fs], JsonlWriter(f"{tmp}/f_out")],
                          tasks=1, workers=1, logging_dir=f"{tmp}/f_logs").run()
    t_filters_e2e = time.process_time() - t0
    t0 = time.process_time()
    LocalPipelineExecutor([reader(), MinhashDedupSignature(f"{tmp}/e_sigs", config=cfg)],
                          tasks=1, workers=1, logging_dir=f"{tmp}/e1").run()
    LocalPipelineExecutor([MinhashDedupBuckets(f"{tmp}/e_sigs", f"{tmp}/e_buckets", config=cfg)],
                          tasks=cfg.num_buckets, workers=1, logging_dir=f"{tmp}/e2").run()
    LocalPipelineExecutor([MinhashDedupCluster(f"{tmp}/e_buckets", f"{tmp}/e_remove", config=cfg)],
                          tasks=1, workers=1, logging_dir=f"{tmp}/e3").run()
    LocalPipelineExecutor([reader(), MinhashDedupFilter(f"{tmp}/e_remove"),
                           JsonlWriter(f"{tmp}/m_out")],
                          tasks=1, workers=1, logging_dir=f"{tmp}/e4").run()
    t_minhash_e2e = time.process_time() - t0
    json.dump({"filters_s": t_filters, "filters_kept": sum(verdicts), "verdicts": verdicts,
               "minhash_s": t_all, "minhash_signature_s": t_sig, "removed": sorted(removed),
               "filters_pipeline_s": t_filters_e2e, "minhash_pipeline_s": t_minhash_e2e},
              sys.stdout)
""")

_RENSA = textwrap.dedent("""
    import json, re, sys, time
    import rensa
    docs = [json.loads(l)["text"] for l in open(sys.argv[1])]
    word = re.compile(r"[0-9a-z\\x80-\\U0010ffff]+")
    best = None
    for _ in range(3):   # the best of 3 runs, as for ours in memory
      t0 = time.process_time()
      sets = []
      for t in docs:
          w = word.findall(t.lower())
          sets.append([" ".join(w[i:i + 5]) for i in range(max(len(w) - 4, 1))] if w else [])
      t_shingles = time.process_time() - t0
      mh = rensa.RMinHash.from_token_sets(sets, num_perm=112, seed=1)
      lsh = rensa.RMinHashLSH(threshold=0.8, num_perm=112, num_bands=14)
      lsh.insert_many(mh)
      cands = lsh.query_all(mh)
      parent = list(range(len(docs)))
      def find(x):
          while parent[x] != x:
              parent[x] = parent[parent[x]]
              x = parent[x]
          return x
      for i, cs in enumerate(cands):
          for j in cs:
              a, b = find(i), find(j)
              if a != b:
                  parent[max(a, b)] = min(a, b)
      removed = [i for i in range(len(docs)) if find(i) != i]
      t = time.process_time() - t0
      if best is None or t < best["minhash_s"]:
          best = {"minhash_s": t, "shingles_s": t_shingles, "removed": removed}
    json.dump(best, sys.stdout)
""")

_PRESIDIO = textwrap.dedent("""
    import json, logging, sys, tempfile, time
    logging.disable(logging.WARNING)
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    blank = tempfile.mkdtemp() + "/blank_en"
    spacy.blank("en").to_disk(blank)   # no NER model: pattern recognizers only
    engine = AnalyzerEngine(nlp_engine=SpacyNlpEngine(models=[{"lang_code": "en",
                                                               "model_name": blank}]),
                            supported_languages=["en"])
    texts = json.load(open(sys.argv[1]))
    engine.analyze(text="warm up 8.8.8.8", language="en")
    names = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "IP_ADDRESS": "IP_ADDRESS",
             "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN", "US_SSN": "SSN"}
    t0 = time.process_time()
    spans = [[(r.start, r.end, names[r.entity_type]) for r in engine.analyze(text=t, language="en")
              if r.entity_type in names] for t in texts]
    json.dump({"s": time.process_time() - t0, "spans": spans}, sys.stdout)
""")


def _side(venv: str, script: str, arg: str, need: str) -> dict | None:
    """Run `script` with the side venv's python; None (and a note) if it cannot."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        print(f"no python at {py}; skipping {need}", file=sys.stderr)
        return None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "PYTHONPATH": "",
           "LOGURU_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.py")
        with open(path, "w") as f:
            f.write(script)
        r = subprocess.run([py, path, arg], capture_output=True, text=True, env=env, cwd=tmp,
                           check=False)
    if r.returncode != 0:
        print(f"{need} run failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_pii(venv: str) -> dict:
    """Ours vs Presidio (pattern recognizers, blank spaCy pipeline) on the frozen PII set."""
    from llm.data.curate import filter_eval, pii

    rows = filter_eval.load_pii()
    texts = [r["text"] for r in rows] * 20            # 20 passes: enough CPU time to measure
    t0 = time.process_time()
    for t in texts:
        pii.find(t, ip_scope="all")
    ours_s = time.process_time() - t0
    out = {"sentences": len(texts),
           "ours": {"sentences_per_s": round(len(texts) / ours_s, 1),
                    "per_type": _pii_table(filter_eval.score_pii(
                        lambda t: pii.find(t, ip_scope="all"), rows))}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "texts.json")
        with open(path, "w") as f:
            json.dump(texts, f)
        pr = _side(venv, _PRESIDIO, path, "presidio-analyzer") if venv else None
    if pr:
        by_text = dict(zip(texts, pr["spans"]))
        res = filter_eval.score_pii(lambda t: [tuple(x) for x in by_text[t]], rows)
        out["presidio"] = {"sentences_per_s": round(len(texts) / pr["s"], 1),
                           "per_type": _pii_table(res)}
        out["speedup"] = round(pr["s"] / ours_s, 1)
    return out


def _pii_table(res: dict) -> dict:
    return {t: {"tp": r["tp"], "fn": r["fn"], "fp": r["fp"],
                "recall": None if r["recall"] is None else round(r["recall"], 3),
                "precision": None if r["precision"] is None else round(r["precision"], 3)}
            for t, r in res.items()}


CONDITIONS = {
    "filters": "Gopher quality (min 50 / max 100000 words, mean word length 3-10, symbol/word "
               "<= 0.1, bullet lines <= 0.9, ellipsis lines <= 0.3, alphabetic words >= 0.8, "
               ">= 2 stop words) + Gopher repetition (Gopher table A1) + C4 (terminal "
               "punctuation on, >= 3 words per line, >= 5 sentences, lorem ipsum, javascript, "
               "curly bracket, policy lines); same thresholds on every side",
    "minhash": "word 5-grams, 14 bands x 8 rows (112 permutations); ours and datatrove 64-bit "
               "hashes, rensa 32-bit (fixed by its API)",
    "threads": "1 (OMP/OPENBLAS/MKL/RAYON_NUM_THREADS=1); figures are documents per CPU-second",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000, help="corpus size (20%% planted variants)")
    ap.add_argument("--venv", default="/tmp/bench-venv",
                    help="side virtualenv with datatrove, spaCy, rensa, presidio-analyzer")
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, "1")
    from llm.data.curate.minhash import jaccard

    docs, pairs = make_corpus(args.docs, args.seed)
    sims = [jaccard(docs[b], docs[v]) for b, v, _ in pairs]
    n = len(docs)
    results = {"docs": n, "planted_pairs": len(pairs), "conditions": CONDITIONS,
               "load_average": os.getloadavg(),
               "mean_words_per_doc": round(sum(len(d.split()) for d in docs) / n, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w") as f:
            for t in docs:
                f.write(json.dumps({"text": t}) + "\n")
        ours = bench_ours(docs)
        ours.update(bench_ours_e2e(corpus, n, tmp))
        dt = _side(args.venv, _DATATROVE, corpus, "datatrove") if args.venv else None
        rn = _side(args.venv, _RENSA, corpus, "rensa") if args.venv else None
    rows = {}

    def row(name, seconds, **extra):
        rows[name] = {"docs_per_cpu_s": round(n / seconds, 1), **extra}

    for mode in ("native", "datatrove"):
        r = ours[f"filters_{mode}"]
        agree = (round(sum(a == b for a, b in zip(r["verdicts"], dt["verdicts"])) / n, 4)
                 if dt else None)
        row(f"filters, ours {mode} words, step-only", r["s"], kept=r["kept"],
            verdict_agreement_with_datatrove=agree)
    row("filters, ours native, end to end", ours["filters_pipeline"]["s"],
        kept=ours["filters_pipeline"]["kept"])
    if dt:
        row("filters, datatrove, step-only", dt["filters_s"], kept=dt["filters_kept"])
        row("filters, datatrove, end to end", dt["filters_pipeline_s"])
    m = ours["minhash_memory"]
    row("minhash, ours in memory, step-only", m["s"], **score(set(m["removed"]), pairs, sims))
    row("minhash, ours pipeline (stage files on disk), end to end", ours["minhash_pipeline"]["s"],
        **score(set(ours["minhash_pipeline"]["removed"]), pairs, sims))
    if dt:
        row("minhash, datatrove 3 stages (files on disk), step-only", dt["minhash_s"],
            **score(set(dt["removed"]), pairs, sims))
        row("minhash, datatrove 4 stages + read/write, end to end", dt["minhash_pipeline_s"])
    if rn:
        row("minhash, rensa in memory (shingles in Python), step-only", rn["minhash_s"],
            **score(set(rn["removed"]), pairs, sims))
    results["rows"] = rows

    def ratio(a, b):
        return round(rows[a]["docs_per_cpu_s"] / rows[b]["docs_per_cpu_s"], 2) \
            if a in rows and b in rows else None

    results["ratios"] = {
        "filters step-only, ours native / datatrove": ratio(
            "filters, ours native words, step-only", "filters, datatrove, step-only"),
        "filters step-only, ours datatrove-mode / datatrove": ratio(
            "filters, ours datatrove words, step-only", "filters, datatrove, step-only"),
        "filters end to end, ours native / datatrove": ratio(
            "filters, ours native, end to end", "filters, datatrove, end to end"),
        "minhash step-only, ours in memory / datatrove 3 stages on disk": ratio(
            "minhash, ours in memory, step-only",
            "minhash, datatrove 3 stages (files on disk), step-only"),
        "minhash end to end, ours pipeline / datatrove pipeline": ratio(
            "minhash, ours pipeline (stage files on disk), end to end",
            "minhash, datatrove 4 stages + read/write, end to end"),
        "minhash in memory, ours / rensa": ratio(
            "minhash, ours in memory, step-only",
            "minhash, rensa in memory (shingles in Python), step-only"),
    }
    results["pii"] = bench_pii(args.venv)
    print(json.dumps(results, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
