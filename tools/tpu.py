"""Launch experiments on Cloud TPU VMs: one command per step, each a few `gcloud` calls.

    python tools/tpu.py create --name=exp1 --zone=us-west4-a --accelerator_type=v5litepod-8 --spot
    python tools/tpu.py setup  --name=exp1 --zone=us-west4-a
    python tools/tpu.py run    --name=exp1 --zone=us-west4-a -- \
        python -m experiments.pretrain_ntp --gin_file=gin_configs/experiments/quickstart.gin
    python tools/tpu.py logs   --name=exp1 --zone=us-west4-a [--worker=0]
    python tools/tpu.py ssh    --name=exp1 --zone=us-west4-a [--worker=0]
    python tools/tpu.py delete --name=exp1 --zone=us-west4-a

Every subcommand takes `--dry_run`, which prints the exact commands (one per line, shell-quoted)
instead of running them. `create` asks for a queued resource (`<name>-qr`, node `<name>`): spot
with `--spot`, on-demand otherwise. `setup` copies this checkout (`git archive HEAD`) to every
worker and installs it there from requirements.lock with the `[tpu]` extra. `run` starts the same
command on all workers at once, in the background under nohup (it survives the ssh session),
with `LLM_DISTRIBUTED=auto` so `jax.distributed.initialize()` finds the other hosts by itself;
its output goes to ~/llm-run.log on each worker (`logs`).

Multi-slice: `--num_slices=N` (same value for every subcommand) asks for N slices in one queued
resource (`--node-count=N --node-prefix=<name>`; the slices are the nodes `<name>-0` ..
`<name>-<N-1>`), and setup/run then address every worker of every slice; `run` adds
`--gin_param=make_mesh.dcn=N` so the mesh gets its across-slices axis (docs/tpu.md).
`logs` / `ssh` take `--slice` (default 0).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "llm"  # under the worker's home directory
LOG = "~/llm-run.log"
# TPU VM software versions by generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


class LaunchError(Exception):
    """A user-fixable problem: one line on stderr, exit code 2."""


def runtime_version(accelerator_type: str) -> str:
    gen = accelerator_type.split("-")[0]
    if gen not in RUNTIME_VERSIONS or not accelerator_type.split("-")[-1].isdigit():
        raise LaunchError(f"--accelerator_type={accelerator_type!r} is not a TPU VM type "
                          "this tool knows; use e.g. v4-8, v5litepod-8, v5p-64 or v6e-8 (or "
                          "give --runtime_version yourself).")
    return RUNTIME_VERSIONS[gen]


def _where(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _nodes(args) -> list[str]:
    """The TPU VM node names: `<name>`, or `<name>-0` .. for a multi-slice queued resource."""
    if args.num_slices < 1:
        raise LaunchError(f"--num_slices={args.num_slices} must be >= 1.")
    if args.num_slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(args.num_slices)]


def _ssh(args, command: str | None, worker: str, node: str | None = None) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node or args.name, *_where(args),
           f"--worker={worker}"]
    return cmd + ([f"--command={command}"] if command is not None else [])


def _one_node(args) -> str:
    nodes = _nodes(args)
    if not 0 <= args.slice < len(nodes):
        raise LaunchError(f"--slice={args.slice} is not in [0, {len(nodes)}) "
                          f"(--num_slices={args.num_slices}).")
    return nodes[args.slice]


def create_commands(args) -> list[list[str]]:
    version = args.runtime_version or runtime_version(args.accelerator_type)
    node = ([f"--node-id={args.name}"] if len(_nodes(args)) == 1 else
            [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"])
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", f"{args.name}-qr",
           *node, *_where(args), f"--accelerator-type={args.accelerator_type}",
           f"--runtime-version={version}"]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def setup_commands(args) -> list[list[str]]:
    tarball = f"/tmp/{args.name}-llm.tar.gz"
    install = " && ".join([
        f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR}",
        f"tar -xzf ~/{os.path.basename(tarball)} -C ~/{REMOTE_DIR}",
        f"cd ~/{REMOTE_DIR}",
        "python3 -m pip install --upgrade pip",
        # The pinned environment, then the project with libtpu at the pinned jax's version.
        "python3 -m pip install -r requirements.lock",
        "python3 -m pip install -c requirements.lock -e '.[tpu]'",
        "python3 -c 'import jax; print(jax.device_count(), jax.devices()[0].device_kind)'",
    ])
    commands = [["git", "-C", REPO, "archive", "--format=tar.gz", "-o", tarball, "HEAD"]]
    for node in _nodes(args):
        commands += [["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:~/",
                      *_where(args), "--worker=all"],
                     _ssh(args, install, "all", node)]
    return commands


def run_commands(args) -> list[list[str]]:
    if not args.command:
        raise LaunchError("run: give the command after `--`, e.g. `tools/tpu.py run --name=N "
                          "--zone=Z -- python -m experiments.pretrain_ntp --gin_file=...`.")
    command = list(args.command)
    if command[0] == "python":
        command[0] = "python3"
    nodes = _nodes(args)
    if len(nodes) > 1:
        command.append(f"--gin_param=make_mesh.dcn={len(nodes)}")
    remote = (f"cd ~/{REMOTE_DIR} && LLM_DISTRIBUTED=auto nohup {shlex.join(command)} "
              f"> {LOG} 2>&1 < /dev/null &")
    return [_ssh(args, remote, "all", node) for node in nodes]


def logs_commands(args) -> list[list[str]]:
    return [_ssh(args, f"tail -n {args.lines} {'-f ' if args.follow else ''}{LOG}", args.worker,
                 _one_node(args))]


def ssh_commands(args) -> list[list[str]]:
    return [_ssh(args, None, args.worker, _one_node(args))]


def delete_commands(args) -> list[list[str]]:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", f"{args.name}-qr",
             *_where(args), "--force", "--quiet"]]


COMMANDS = {"create": create_commands, "setup": setup_commands, "run": run_commands,
            "logs": logs_commands, "ssh": ssh_commands, "delete": delete_commands}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="subcommand", required=True)
    for name in COMMANDS:
        s = sub.add_parser(name)
        s.add_argument("--name", required=True, help="TPU VM (node) name")
        s.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-east5-a (v5p)")
        s.add_argument("--project", default=None, help="default: gcloud's configured project")
        s.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        s.add_argument("--num_slices", type=int, default=1,
                       help="slices in the queued resource (multi-slice over DCN)")
        if name == "create":
            s.add_argument("--accelerator_type", required=True,
                           help="v4-8, v5litepod-8, v5p-64, v6e-8, ...")
            s.add_argument("--runtime_version", default=None)
            s.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
        if name in ("logs", "ssh"):
            s.add_argument("--worker", default="0", help="worker index (logs, ssh)")
            s.add_argument("--slice", type=int, default=0, help="slice index (multi-slice)")
        if name == "logs":
            s.add_argument("--lines", type=int, default=100)
            s.add_argument("--follow", action="store_true")
        if name == "run":
            s.add_argument("command", nargs=argparse.REMAINDER,
                           help="after `--`: the command every worker runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        commands = COMMANDS[args.subcommand](args)
        if args.dry_run:
            for cmd in commands:
                print(shlex.join(cmd))
            return 0
        if shutil.which("gcloud") is None:
            raise LaunchError("gcloud is not on PATH; install the Google Cloud CLI "
                              "(cloud.google.com/sdk/docs/install) and run `gcloud auth login`, "
                              "or pass --dry_run to print the commands.")
        for cmd in commands:
            print(f"+ {shlex.join(cmd)}", flush=True)
            rc = subprocess.run(cmd).returncode
            if rc:
                return rc
    except LaunchError as e:
        print(f"tpu: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
