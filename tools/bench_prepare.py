"""Streaming `prepare`: peak memory at two corpus sizes (the ratio shows memory is bounded).

    python -m tools.bench_prepare --sizes_mb=100,1000 --workers=2 [--tmp=/tmp] [--keep]

For each size it writes a synthetic two-domain JSONL corpus of about that many MB of text
(documents of ~4 KB: random paragraphs from a seeded pool plus a unique first line, in files of
~50 MB), runs `python -m tools.prepare_data` on it in a fresh process, and samples the resident
memory of that process and its tokenizing workers every 50 ms (psutil). It prints a table and
writes JSON (`--json`): peak RSS of the main process and of the whole process tree, wall time, and
the ratio of the largest size's peaks to the smallest's (goal: <= 1.3x). The corpora and prepared
directories are deleted afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_BYTES = 4000
FILE_BYTES = 50_000_000


def _paragraphs(rng: random.Random, n: int = 2000) -> list[str]:
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    out = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 16))).capitalize()
                     + "." for _ in range(rng.randint(3, 8))]
        out.append(" ".join(sentences))
    return out


def write_corpus(root: str, size_mb: int, seed: int = 0) -> str:
    """JSONL files of ~size_mb MB of text; returns the glob."""
    rng = random.Random(seed)
    paras = _paragraphs(rng)
    os.makedirs(root, exist_ok=True)
    total, i, f, out, written = size_mb * 1_000_000, 0, None, 0, 0
    while written < total:
        if f is None or out >= FILE_BYTES:
            if f is not None:
                f.close()
            f = open(os.path.join(root, f"part-{i // 10_000:05d}.jsonl"), "w")  # noqa: SIM115
            out = 0
        body = [f"Document {i} of the benchmark corpus."]
        while sum(map(len, body)) < DOC_BYTES:
            body.append(rng.choice(paras))
        text = "\n".join(body)
        line = json.dumps({"id": f"doc-{i}", "text": text,
                           "domain": "web" if i % 3 else "books"}) + "\n"
        f.write(line)
        out += len(line)
        written += len(text)
        i += 1
    f.close()
    return os.path.join(root, "*.jsonl")


def run_prepare(pattern: str, data_dir: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "tools.prepare_data", f"--data_dir={data_dir}",
           "--gin_param=corpus.name='jsonl'", f"--gin_param=jsonl.path='{pattern}'",
           "--gin_param=jsonl.id_field='id'"]
    if workers:  # 0: leave the setting out (to run a checkout that predates it)
        cmd.append(f"--gin_param=prepare.num_workers={workers}")
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONPATH": REPO})
    root = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main = root.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in root.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"prepare_data failed ({proc.returncode}):\n{out}")
    return {"peak_rss_main_mb": peak_main / 2**20, "peak_rss_tree_mb": peak_tree / 2**20,
            "seconds": time.time() - t, "log": out.strip().splitlines()[-4:]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", default="100,1000")
    p.add_argument("--workers", type=int, default=2, help="prepare.num_workers (0: not set)")
    p.add_argument("--tmp", default=tempfile.gettempdir())
    p.add_argument("--json", default="")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for size in [int(s) for s in args.sizes_mb.split(",")]:
        root = tempfile.mkdtemp(prefix=f"bench_prepare_{size}mb_", dir=args.tmp)
        try:
            pattern = write_corpus(os.path.join(root, "corpus"), size)
            input_mb = sum(os.path.getsize(os.path.join(root, "corpus", n))
                           for n in os.listdir(os.path.join(root, "corpus"))) / 1e6
            r = run_prepare(pattern, os.path.join(root, "data"), args.workers)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        rows.append({"text_mb": size, "input_mb": round(input_mb, 1), **r})
        print(f"{size:>6} MB text ({input_mb:.0f} MB JSONL): peak RSS main "
              f"{r['peak_rss_main_mb']:.0f} MB, tree {r['peak_rss_tree_mb']:.0f} MB, "
              f"{r['seconds']:.0f} s", flush=True)
    result = {"workers": args.workers, "load_average": os.getloadavg(), "rows": rows}
    if len(rows) > 1:
        result["ratio_main"] = rows[-1]["peak_rss_main_mb"] / rows[0]["peak_rss_main_mb"]
        result["ratio_tree"] = rows[-1]["peak_rss_tree_mb"] / rows[0]["peak_rss_tree_mb"]
        print(f"peak RSS ratio {rows[-1]['text_mb']} MB / {rows[0]['text_mb']} MB: main "
              f"{result['ratio_main']:.2f}x, process tree {result['ratio_tree']:.2f}x "
              f"(load average {result['load_average'][0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
