"""Curate raw text into clean shards plus a datasheet.

    python -m tools.curate --gin_file=gin_configs/data/stdlib.gin
    python -m tools.curate --gin_file=gin_configs/data/web.gin \
        --gin_param="curate.out_dir='runs/web'" --gin_param="curate.workers=2"

Writes <out_dir>/kept/part-*.jsonl.gz and part-*.array_record, <out_dir>/removed/, and
<out_dir>/datasheet.{md,json}. Rerunning the same command resumes an interrupted run; pass
--restart to start over. See docs/curation.md.
"""

from __future__ import annotations

import argparse
import inspect
import sys

import gin

from llm.config import ConfigError, parse_gin
from llm.data.curate.records import CurationError
from llm.data.curate.run import curate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gin_file", action="append", default=[],
                    help="gin config(s), e.g. gin_configs/data/stdlib.gin")
    ap.add_argument("--gin_param", action="append", default=[],
                    help="extra bindings, e.g. \"curate.workers=2\"")
    ap.add_argument("--out_dir", help="shortcut for curate.out_dir")
    ap.add_argument("--workers", type=int, help="shortcut for curate.workers")
    ap.add_argument("--runner", choices=["local", "beam"], help="shortcut for curate.runner")
    ap.add_argument("--restart", action="store_true", help="discard an earlier partial run")
    args = ap.parse_args(argv)
    params = list(args.gin_param)
    for key in ("out_dir", "runner"):
        if getattr(args, key):
            params.append(f"curate.{key}={getattr(args, key)!r}")
    if args.workers:
        params.append(f"curate.workers={args.workers}")
    if args.restart:
        params.append("curate.restart=True")
    if args.gin_file:
        params.append(f"curate.recipe={args.gin_file[-1]!r}")
    try:
        parse_gin(args.gin_file, params)
        ds = curate()
    except (ConfigError, CurationError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__  # gin appends call lines
        print(f"curate: error: {msg}", file=sys.stderr)
        return 2
    a = ds["accounting"]
    try:
        out_dir = gin.query_parameter("curate.out_dir")
    except ValueError:  # not bound: the default
        out_dir = inspect.signature(curate).parameters["out_dir"].default
    print(f"curate: {a['input']} input documents -> {a['kept_unique']} kept, {a['removed']} "
          f"removed (accounting OK). Datasheet: {out_dir}/datasheet.md")
    bad = ds.get("corrupt_files", {})
    if bad.get("count"):
        where = ", ".join(bad["where"][:5]) + (", ..." if bad["count"] > 5 else "")
        print(f"curate: WARNING: {bad['count']} compressed input file(s) corrupt or truncated "
              f"({where}): the documents before each break were read; an unknown number of "
              "documents after it were lost and are not in the counts above. Re-fetch the "
              "file(s) and rerun with --restart.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
