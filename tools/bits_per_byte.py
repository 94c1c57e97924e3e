"""Bits per byte of run directories on the validation split of prepared data directories.

    python -m tools.bits_per_byte --run_dir=runs/quickstart --run_dir=runs/domain \
        --data_dir=general=data/embedded --data_dir=domain=runs/domain_data [--max_batches=40] \
        [--out=report.json]

For continued pretraining: how a domain-tuned run compares with its base on the domain and on the
general data (docs/post_training.md). Every run must use the data directories' tokenizer. The same
rows are scored for every run (an unshuffled pass over the split, the first `max_batches` batches
of 8 rows of the run's training length, or all of it); bits per byte divide by the bytes of
exactly the tokens scored (the split's mean bytes per token when `max_batches` cuts it).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from llm.config import ConfigError
from llm.data.pipeline import make_dataset
from llm.data.shards import load_dataset_info
from llm.data.sources import DataError
from llm.eval.perplexity import accumulate, summarize
from llm.posttrain.init import file_sha256
from llm.runs import load_run
from llm.train.loss import decoder_loss


def bits_per_byte(run_dir: str, data_dir: str, max_batches: int | None = None,
                  rows: int = 8) -> dict:
    """{"bits_per_byte", "loss", "tokens", ...} of `run_dir`'s latest checkpoint on the
    validation split of `data_dir`."""
    run = load_run(run_dir)
    info = load_dataset_info(data_dir)
    if file_sha256(info.tokenizer_path) != file_sha256(run.tokenizer.model_path):
        raise ConfigError(f"run {run_dir} and data_dir {data_dir} use different tokenizers.")
    split = info.splits["validation"]
    batches = make_dataset(data_dir, "validation", seq_len=run.seq_len, global_batch_size=rows,
                           seed=0, shuffle=False, num_epochs=1, process_index=0,
                           process_count=1)
    loss_fn = jax.jit(decoder_loss(run.graphdef))
    sums = accumulate(loss_fn, run.params, batches, lambda b: b, max_batches)
    return summarize(sums, bytes_per_token=split.num_bytes / split.num_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bits_per_byte",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", action="append", required=True)
    parser.add_argument("--data_dir", action="append", required=True, help="name=path")
    parser.add_argument("--max_batches", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        data = dict(d.split("=", 1) for d in args.data_dir)
    except ValueError:
        print("bits_per_byte: error: --data_dir takes name=path", file=sys.stderr)
        return 2
    report = {}
    try:
        for run_dir in args.run_dir:
            report[run_dir] = {name: bits_per_byte(run_dir, path, args.max_batches)
                               for name, path in data.items()}
    except (ConfigError, DataError) as e:
        print(f"bits_per_byte: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    names = list(data)
    print("| run | " + " | ".join(f"{n} bits/byte" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for run_dir, r in report.items():
        print(f"| {run_dir} | " + " | ".join(f"{r[n]['bits_per_byte']:.4f}" for n in names)
              + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"max_batches": args.max_batches, "data_dirs": data, "runs": report}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
