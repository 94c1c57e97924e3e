"""Memorization audit of a run: canary exposure per repetition count, verbatim extraction.

    python -m tools.memorization --run_dir=runs/canary [--num_candidates=1000] [--windows=256] \
        [--prefix_len=32] [--suffix_len=32] [--seed=0] [--step=N] [--out_dir=runs/canary/eval]

writes <out_dir>/memorization.json and memorization.png (see `llm.eval.memorization` for the
definitions). The run's data must have been prepared with canaries for the exposure part, e.g.

    python -m experiments.pretrain_ntp ... --gin_param='canaries.counts=[1, 4, 16, 64]'
"""

from __future__ import annotations

import argparse
import sys

from llm.config import ConfigError
from llm.data.sources import DataError


def summary(result: dict) -> str:
    lines = []
    if result["exposure"]:
        e = result["exposure"]
        lines.append(f"exposure (bits; log2|R| = {e['space_size_log2']:.1f}, {e['num_candidates']}"
                     f" sampled candidates, sampling ceiling {e['sampled_ceiling']:.1f}):")
        lines.append("  count  canaries  sampled  extrapolated  greedy-extracted")
        for r in e["by_count"]:
            lines.append(f"  {r['count']:>5}  {r['canaries']:>8}  "
                         f"{r['exposure_sampled_mean']:>7.2f}  "
                         f"{r['exposure_extrapolated_mean']:>12.2f}  "
                         f"{r['greedy_extracted']:>3}/{r['canaries']}")
    else:
        lines.append("exposure: the run's data has no canaries (canaries.json); skipped.")
    x = result["extraction"]
    for split in ("train", "validation"):
        s = x[split]
        lines.append(f"extraction {split}: {s['exact']}/{s['n']} exact {x['suffix_len']}-token "
                     f"suffixes (rate {s['rate']:.4f} +- {s['stderr']:.4f}), token match "
                     f"{s['token_match']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.memorization",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--num_candidates", type=int, default=1000,
                        help="random secrets scored per canary")
    parser.add_argument("--windows", type=int, default=256,
                        help="documents (one window each) per split for extraction")
    parser.add_argument("--prefix_len", type=int, default=32)
    parser.add_argument("--suffix_len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out_dir", default=None, help="default <run_dir>/eval")
    args = parser.parse_args(argv)
    from llm.eval.memorization import audit

    try:
        result = audit(args.run_dir, step=args.step, num_candidates=args.num_candidates,
                       num_windows=args.windows, prefix_len=args.prefix_len,
                       suffix_len=args.suffix_len, seed=args.seed, batch_size=args.batch_size,
                       out_dir=args.out_dir)
    except (DataError, ConfigError) as e:
        print(f"memorization: error: {e}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
