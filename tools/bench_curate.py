"""Benchmark: our curation blocks vs datatrove's, same corpus, same run, one core each.

Measures documents per CPU-second (process time of a single-threaded process, so the figure is
per core and insensitive to other load on the machine) for
  (a) Gopher quality + Gopher repetition + C4 filters,
  (b) MinHash signatures + LSH bucketing + clustering (14 bands x 8 rows, 5-grams, 64-bit),
and near-duplicate recall/precision of both on planted pairs of known Jaccard similarity.

datatrove runs in its own virtualenv (never in .venv); create it once:
    python3.11 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install "datatrove[processing]==0.10.1" spacy
then:
    python -m tools.bench_curate --venv /tmp/bench-venv --docs 4000 --out runs/bench_curate.json

Without --venv (or if the venv lacks datatrove) only our figures are printed.
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


def bench_ours(docs: list[str], unit_size: int = 1000) -> dict:
    from llm.data.curate import minhash, quality
    from llm.data.sources import Document

    ds = [Document(str(i), t, "bench", {"domain": "web"}) for i, t in enumerate(docs)]
    t0 = time.process_time()
    kept = 0
    for d in ds:
        r = quality.gopher_quality(d)
        if not isinstance(r, str):
            r = quality.gopher_repetition(d)
        if not isinstance(r, str):
            r = quality.c4(d)
        kept += not isinstance(r, str)
    t_filters = time.process_time() - t0
    t0 = time.process_time()
    parts = [(u, minhash.analyze(list(enumerate(ds))[s:s + unit_size]))
             for u, s in enumerate(range(0, len(ds), unit_size))]
    t_sig = time.process_time() - t0
    state = minhash.combine(parts)
    t_all = time.process_time() - t0
    return {"filters_s": t_filters, "filters_kept": kept, "minhash_s": t_all,
            "minhash_signature_s": t_sig, "removed": sorted(state["removed"].tolist())}


_DATATROVE = textwrap.dedent('''
    import json, os, struct, sys, tempfile, time
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                                  MinhashDedupCluster, MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig
    docs = [json.loads(l)["text"] for l in open(sys.argv[1])]
    mk = lambda: (Document(text=t, id=str(i)) for i, t in enumerate(docs))
    fs = [GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter()]
    for f in fs:  # warm up lazy tokenizers
        f.filter(Document(text="warm up text. " * 20, id="w"))
    t0 = time.process_time(); kept = 0
    for d in mk():
        ok = True
        for f in fs:
            r = f.filter(d)
            if not (r is True or (isinstance(r, tuple) and r[0])):
                ok = False
                break
        kept += ok
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
    json.dump({"filters_s": t_filters, "filters_kept": kept, "minhash_s": t_all,
               "minhash_signature_s": t_sig, "removed": sorted(removed)}, sys.stdout)
''')


def bench_datatrove(venv: str, docs: list[str]) -> dict | None:
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        print(f"no python at {py}; skipping datatrove", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w") as f:
            for t in docs:
                f.write(json.dumps({"text": t}) + "\n")
        script = os.path.join(tmp, "dt.py")
        with open(script, "w") as f:
            f.write(_DATATROVE)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "PYTHONPATH": "", "LOGURU_LEVEL": "WARNING"}
        r = subprocess.run([py, script, corpus], capture_output=True, text=True, env=env,
                           cwd=tmp, check=False)
    if r.returncode != 0:
        print(f"datatrove run failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000, help="corpus size (20%% planted variants)")
    ap.add_argument("--venv", default="/tmp/bench-venv", help="virtualenv with datatrove")
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, "1")
    from llm.data.curate.minhash import jaccard

    docs, pairs = make_corpus(args.docs, args.seed)
    sims = [jaccard(docs[b], docs[v]) for b, v, _ in pairs]
    n = len(docs)
    results = {"docs": n, "planted_pairs": len(pairs),
               "mean_words_per_doc": round(sum(len(d.split()) for d in docs) / n, 1)}
    runs = {"ours": bench_ours(docs)}
    dt = bench_datatrove(args.venv, docs) if args.venv else None
    if dt:
        runs["datatrove"] = dt
    for name, r in runs.items():
        results[name] = {
            "filters_docs_per_s": round(n / r["filters_s"], 1),
            "filters_kept": r["filters_kept"],
            "minhash_docs_per_s": round(n / r["minhash_s"], 1),
            "minhash_signature_docs_per_s": round(n / r["minhash_signature_s"], 1),
            **score(set(r["removed"]), pairs, sims)}
    if dt:
        results["speedup_filters"] = round(results["ours"]["filters_docs_per_s"]
                                           / results["datatrove"]["filters_docs_per_s"], 2)
        results["speedup_minhash"] = round(results["ours"]["minhash_docs_per_s"]
                                           / results["datatrove"]["minhash_docs_per_s"], 2)
    print(json.dumps(results, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
