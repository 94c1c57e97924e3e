"""Host-side throughput of the grain training pipeline (read, shuffle, pack, row shuffle, batch).

    .venv/bin/python -m tools.bench_pipeline --data_dir=data/embedded --seq_len 256 --batch 16

Prepares `data_dir` first if needed (the default embedded corpus), then times `next(it)` on
`make_dataset(...)` for each stream count and prints batches/s and tokens/s. The pipeline must
stay far faster than a train step (~0.5-1.5 s on 2 CPU cores for the tiny configs).
"""

from __future__ import annotations

import argparse
import json
import time

from llm.data.pipeline import make_dataset
from llm.data.prepare import prepare


def bench(data_dir: str, seq_len: int, batch: int, streams: int, batches: int) -> dict:
    it = iter(make_dataset(data_dir, "train", seq_len=seq_len, global_batch_size=batch, seed=0,
                           num_streams=streams, process_index=0, process_count=1))
    next(it)  # fills the first shuffle window
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - start
    return {"streams": streams, "batches_per_s": batches / dt,
            "tokens_per_s": batches * batch * seq_len / dt}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data/embedded")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    prepare(args.data_dir)
    rows = [bench(args.data_dir, args.seq_len, args.batch, int(s), args.batches)
            for s in args.streams.split(",")]
    print(f"{'streams':>8} {'batches/s':>10} {'tokens/s':>12}")
    for r in rows:
        print(f"{r['streams']:>8} {r['batches_per_s']:>10.0f} {r['tokens_per_s']:>12,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
