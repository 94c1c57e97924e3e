"""Hugging Face interop CLI (`llm.interop.hf`).

    python -m tools.hf export --run_dir=runs/X --out=hf/X [--step=N] [--dtype=auto]
                          [--max_shard_bytes=N]
    python -m tools.hf import --hf_dir=hf/X --run_dir=runs/Y [--seq_len=N] [--tokenizer=SPM]
    python -m tools.hf check --run_dir=runs/X --hf_dir=hf/X   # logits, greedy, decode tok/s

Bad input (unsupported architecture, a missing config.json field, a tensor whose shape does not
match config.json, a run directory that is not one) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from llm.config import ConfigError
from llm.data.sources import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.hf",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="run directory -> HF model directory")
    p.add_argument("--run_dir", required=True)
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 | auto (an imported run's source dtype, "
                        "else float32)")
    p.add_argument("--max_shard_bytes", type=int, default=None,
                   help="shard the weights (model-0000i-of-0000n.safetensors + index.json)")
    p = sub.add_parser("import", help="HF model directory -> run directory")
    p.add_argument("--hf_dir", required=True)
    p.add_argument("--run_dir", required=True, help="new run directory to write")
    p.add_argument("--seq_len", type=int, default=None,
                   help="TrainConfig.seq_len recorded (default: min(max positions, 2048))")
    p.add_argument("--tokenizer", default=None,
                   help="a SentencePiece model to use instead of --hf_dir's tokenizer.model "
                        "or tokenizer.json")
    p = sub.add_parser("check", help="compare a run with a HF directory through transformers")
    p.add_argument("--run_dir", required=True)
    p.add_argument("--hf_dir", required=True)
    p.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    from llm.interop import hf

    try:
        if args.command == "export":
            out = hf.export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype,
                                 max_shard_bytes=args.max_shard_bytes)
        elif args.command == "import":
            out = hf.import_hf(args.hf_dir, args.run_dir, seq_len=args.seq_len,
                                 tokenizer=args.tokenizer)
        else:
            import json

            out = json.dumps(hf.compare(args.run_dir, args.hf_dir, new_tokens=args.new_tokens),
                             indent=1)
    except (ConfigError, DataError) as e:
        print(f"hf {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
