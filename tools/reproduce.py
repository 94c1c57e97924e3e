"""Replay a run directory and say whether it reproduces, bit for bit.

    python tools/reproduce.py runs/ntp [--steps N] [--out DIR] [--allow_data_change]
                              [--gin_param=B ...]

1. Reads RUN_DIR/manifest.json and checks what it recorded against this checkout and
   environment, naming every difference: the git commit (and a dirty tree), package versions,
   Python, the environment variables that change numerics (XLA_FLAGS, JAX_PLATFORMS), and the
   prepared data (its fingerprint). A changed data fingerprint stops here (exit 2) unless
   `--allow_data_change`: a replay on other data cannot reproduce anything.
2. Re-runs the recorded operative gin config (manifest `gin_config`) with the same experiment
   module into a fresh directory (`--out`, default RUN_DIR.reproduce-<time>), for `--steps N`
   steps (default: all the run's steps). `--gin_param` adds what-if bindings on top.
3. Compares the replay's operative config and mesh with the recorded ones (naming every binding
   that differs), then metrics.jsonl step by step, every recorded number except wall-clock ones
   (step time, throughput, MFU): prints `reproduced: N/N steps bitwise identical` or the first
   step that differs, which metric, and by how much. Exit 0 when reproduced, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llm.train.manifest import git_commit, package_versions  # noqa: E402
from llm.train.metrics import read_metrics  # noqa: E402

# Metrics measured with a clock: never bitwise, and not part of the comparison.
CLOCK_METRICS = re.compile(r"(time|_per_s$|per_sec|/s$|mfu|throughput|elapsed|seconds)", re.I)


class ReproduceError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


def load_manifest(run_dir: str) -> dict:
    path = os.path.join(run_dir, "manifest.json")
    if not os.path.isfile(path):
        raise ReproduceError(f"{run_dir!r} has no manifest.json (is it a run directory? every "
                             "experiment writes one at start-up; pass the directory that holds "
                             "it, e.g. runs/ntp).")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ReproduceError(f"{path} is not valid JSON ({e}).") from None


def parse_bindings(gin_text: str) -> dict[str, str]:
    """{'Configurable.param': 'value text'} of a gin config (multi-line values joined)."""
    out, key = {}, None
    for line in gin_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$", line)
        if m and not line[0].isspace():
            key = m.group(1)
            out[key] = m.group(2).strip()
        elif key is not None:
            out[key] += " " + line.strip()
    return out


def diff_bindings(recorded: str, replay: str, ignore=lambda k: False) -> list[str]:
    """Every binding that differs between two operative configs, one line each."""
    a, b = parse_bindings(recorded), parse_bindings(replay)
    lines = []
    for k in sorted(set(a) | set(b)):
        if ignore(k) or a.get(k) == b.get(k):
            continue
        lines.append(f"gin {k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}")
    return lines


def environment_differences(manifest: dict) -> list[str]:
    """What differs between the recorded environment and this one (besides gin and data)."""
    diffs = []
    rec_git, now_git = manifest.get("git", {}), git_commit(REPO)
    if rec_git.get("commit") != now_git.get("commit"):
        diffs.append(f"git commit: {rec_git.get('commit')} -> {now_git.get('commit')}")
    if rec_git.get("dirty"):
        diffs.append("git: the run was made from a tree with uncommitted changes")
    if now_git.get("dirty"):
        diffs.append("git: this checkout has uncommitted changes")
    rec_pk, now_pk = manifest.get("packages", {}), package_versions()
    for name in sorted(set(rec_pk) | set(now_pk)):
        if rec_pk.get(name) != now_pk.get(name):
            diffs.append(f"package {name}: {rec_pk.get(name)} -> {now_pk.get(name)}")
    now_py = sys.version.split()[0]
    if manifest.get("python") and manifest["python"] != now_py:
        diffs.append(f"python: {manifest['python']} -> {now_py}")
    for var, val in manifest.get("env", {}).items():
        if os.environ.get(var) != val and var != "XLA_FLAGS":  # the replay sets XLA_FLAGS itself
            diffs.append(f"env {var}: {val!r} -> {os.environ.get(var)!r}")
    return diffs


def data_difference(manifest: dict) -> str | None:
    """None when the data directory still holds the recorded dataset, else why not."""
    data = manifest.get("data") or {}
    data_dir = data.get("data_dir")
    if not data_dir:
        return None
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(path):
        return f"the data directory {data_dir} has no dataset.json any more"
    with open(path) as f:
        now = json.load(f).get("fingerprint")
    if now != data.get("fingerprint"):
        return f"data fingerprint in {data_dir}: {data.get('fingerprint')} -> {now}"
    return None


def experiment_module(manifest: dict) -> str:
    """The `experiments.X` module the run was launched with (from the recorded argv)."""
    argv0 = (manifest.get("command") or [""])[0]
    name = os.path.splitext(os.path.basename(argv0))[0]
    if os.path.basename(os.path.dirname(argv0)) != "experiments" or not name:
        raise ReproduceError(f"manifest command {argv0!r} is not an experiments/<name>.py module; "
                             "only runs launched with `python -m experiments.<name>` replay.")
    return f"experiments.{name}"


def replay(manifest: dict, out_dir: str, steps: int | None, extra: list[str]) -> None:
    """Run the recorded config into out_dir (its own run_dir), `steps` steps if given."""
    os.makedirs(out_dir, exist_ok=True)
    gin_file = os.path.join(out_dir, "recorded.gin")
    with open(gin_file, "w") as f:
        f.write(manifest["gin_config"])
    run_dir_keys = [k for k in parse_bindings(manifest["gin_config"]) if k.endswith(".run_dir")]
    args = [f"--gin_file={gin_file}", *(f"--gin_param={k}={out_dir!r}" for k in run_dir_keys)]
    if steps is not None:
        args.append(f"--gin_param=TrainConfig.steps={steps}")
    args += [f"--gin_param={b}" for b in extra]
    env = {**os.environ}
    for var, val in manifest.get("env", {}).items():
        if val is None:
            env.pop(var, None)
        else:
            env[var] = val
    proc = subprocess.run([sys.executable, "-m", experiment_module(manifest), *args], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ReproduceError(f"the replay exited {proc.returncode}: {tail}")


def compare_metrics(recorded: list[dict], replayed: list[dict],
                    steps: int | None) -> tuple[int, int, str | None]:
    """(identical steps, compared steps, first difference or None)."""
    rec = {r["step"]: r for r in recorded}
    rep = {r["step"]: r for r in replayed}
    wanted = sorted(s for s in rec if steps is None or s <= steps)
    same = 0
    for s in wanted:
        if s not in rep:
            return same, len(wanted), f"step {s}: missing from the replay's metrics.jsonl"
        for k in sorted(set(rec[s]) | set(rep[s])):
            if k == "step" or CLOCK_METRICS.search(k):
                continue
            a, b = rec[s].get(k), rep[s].get(k)
            if a != b:
                by = (f"{b - a:+.6g} ({abs(b - a) / max(abs(a), 1e-30):.3g} relative)"
                      if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "")
                return same, len(wanted), f"step {s}: {k} {a!r} -> {b!r} {by}".rstrip()
        same += 1
    return same, len(wanted), None


def reproduce(run_dir: str, *, steps: int | None = None, out_dir: str | None = None,
              allow_data_change: bool = False, gin_params: list[str] = ()) -> int:
    manifest = load_manifest(run_dir)
    if "gin_config" not in manifest:
        raise ReproduceError(f"{run_dir}/manifest.json records no gin_config; it cannot replay.")
    data_diff = data_difference(manifest)
    if data_diff and not allow_data_change:
        raise ReproduceError(f"{data_diff}; a replay on other data cannot reproduce the run "
                             "(re-prepare the recorded data, or pass --allow_data_change).")
    diffs = environment_differences(manifest) + ([data_diff] if data_diff else [])
    out_dir = os.path.abspath(out_dir or f"{run_dir.rstrip('/')}.reproduce-"
                              f"{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        raise ReproduceError(f"--out {out_dir} already holds a run; give a fresh directory.")
    print(f"reproduce: replaying {run_dir} into {out_dir}", flush=True)
    replay(manifest, out_dir, steps, list(gin_params))
    new = load_manifest(out_dir)
    diffs += diff_bindings(manifest["gin_config"], new["gin_config"],
                           ignore=lambda k: k.endswith(".run_dir") or (
                               steps is not None and k == "TrainConfig.steps"))
    if manifest.get("mesh") != new.get("mesh"):
        diffs.append(f"mesh: {manifest.get('mesh')} -> {new.get('mesh')}")
    rec_dev, new_dev = manifest.get("devices", {}), new.get("devices", {})
    for k in ("backend", "kind", "count", "processes"):
        if rec_dev.get(k) != new_dev.get(k):
            diffs.append(f"devices {k}: {rec_dev.get(k)} -> {new_dev.get(k)}")
    for d in diffs:
        print(f"differs: {d}")
    if not diffs:
        print("no differences in code, packages, config, data or mesh")
    same, total, first = compare_metrics(read_metrics(os.path.join(run_dir, "metrics.jsonl")),
                                         read_metrics(os.path.join(out_dir, "metrics.jsonl")),
                                         steps)
    if first is None and total:
        print(f"reproduced: {same}/{total} steps bitwise identical")
        return 0
    print(f"not reproduced: {same}/{total} steps bitwise identical; first difference at "
          f"{first or 'no steps recorded'}")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    p.add_argument("--out", default=None, help="fresh directory for the replay")
    p.add_argument("--allow_data_change", action="store_true",
                   help="replay even if the data fingerprint differs")
    p.add_argument("--gin_param", action="append", default=[],
                   help="extra binding on top of the recorded config (a what-if)")
    args = p.parse_args(argv)
    try:
        if args.steps is not None and args.steps < 1:
            raise ReproduceError(f"--steps={args.steps}: give a positive number of steps.")
        return reproduce(args.run_dir, steps=args.steps, out_dir=args.out,
                         allow_data_change=args.allow_data_change, gin_params=args.gin_param)
    except ReproduceError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
