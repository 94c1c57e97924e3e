"""tools/tpu.py --dry_run: the exact gcloud commands each subcommand would run, and the one-line
error without gcloud on PATH."""

import os
import shlex
import subprocess
import sys

from tests.conftest import REPO

Z = ["--name=exp1", "--zone=us-west4-a"]


def tpu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/tpu.py", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def lines(*args: str) -> list[list[str]]:
    proc = tpu(*args)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def test_create_spot_and_on_demand():
    [spot] = lines("create", *Z, "--accelerator_type=v5litepod-8", "--spot", "--dry_run")
    assert spot == ["gcloud", "compute", "tpus", "queued-resources", "create", "exp1-qr",
                    "--node-id=exp1", "--zone=us-west4-a", "--accelerator-type=v5litepod-8",
                    "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
    [od] = lines("create", "--name=big", "--zone=us-east5-a", "--project=p1",
                 "--accelerator_type=v5p-64", "--dry_run")
    assert "--spot" not in od and "--project=p1" in od
    assert "--runtime-version=v2-alpha-tpuv5" in od and "--accelerator-type=v5p-64" in od


def test_setup_installs_lock_with_tpu_extra_on_all_workers():
    archive, scp, ssh = lines("setup", *Z, "--dry_run")
    assert archive[:2] == ["git", "-C"] and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == archive[archive.index("-o") + 1]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "exp1"]
    assert "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))
    assert "pip install -r requirements.lock" in remote
    assert "pip install -c requirements.lock -e '.[tpu]'" in remote


def test_run_same_command_on_all_workers_with_auto_distributed():
    [ssh] = lines("run", *Z, "--dry_run", "--", "python", "-m", "experiments.pretrain_ntp",
                  "--gin_file=gin_configs/experiments/quickstart.gin")
    assert "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))[len("--command="):]
    assert remote == ("cd ~/llm && LLM_DISTRIBUTED=auto nohup python3 -m experiments.pretrain_ntp "
                      "--gin_file=gin_configs/experiments/quickstart.gin > ~/llm-run.log 2>&1 "
                      "< /dev/null &")


def test_logs_ssh_delete():
    [logs] = lines("logs", *Z, "--worker=3", "--follow", "--dry_run")
    assert "--worker=3" in logs and "--command=tail -n 100 -f ~/llm-run.log" in logs
    [ssh] = lines("ssh", *Z, "--dry_run")
    assert ssh == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "exp1", "--zone=us-west4-a",
                   "--worker=0"]
    [delete] = lines("delete", *Z, "--dry_run")
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "exp1-qr",
                      "--zone=us-west4-a", "--force", "--quiet"]


def test_errors_are_one_line():
    proc = tpu("delete", *Z, env={"PATH": os.path.dirname(sys.executable)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "gcloud is not on PATH" in proc.stderr and "--dry_run" in proc.stderr
    proc = tpu("create", *Z, "--accelerator_type=v9-8", "--dry_run")
    assert proc.returncode == 2 and "v9-8" in proc.stderr and proc.stderr.count("\n") == 1
    proc = tpu("run", *Z, "--dry_run")
    assert proc.returncode == 2 and "after `--`" in proc.stderr


def test_multi_slice_addresses_every_slice():
    """--num_slices=2: one queued resource of 2 nodes (exp1-0, exp1-1); setup and run go to
    every worker of both, run adds the dcn mesh axis; logs/ssh pick a slice."""
    [create] = lines("create", *Z, "--accelerator_type=v5p-64", "--num_slices=2", "--dry_run")
    assert "--node-count=2" in create and "--node-prefix=exp1" in create
    assert not any(a.startswith("--node-id") for a in create)
    _, scp0, ssh0, scp1, ssh1 = lines("setup", *Z, "--num_slices=2", "--dry_run")
    assert "exp1-0:~/" in scp0 and "exp1-1:~/" in scp1
    assert ssh0[5] == "exp1-0" and ssh1[5] == "exp1-1" and "--worker=all" in ssh1
    runs = lines("run", *Z, "--num_slices=2", "--dry_run", "--", "python", "-m",
                 "experiments.pretrain_ntp")
    assert [r[5] for r in runs] == ["exp1-0", "exp1-1"]
    assert all("--gin_param=make_mesh.dcn=2" in r[-1] and "--worker=all" in r for r in runs)
    [logs] = lines("logs", *Z, "--num_slices=2", "--slice=1", "--dry_run")
    assert logs[5] == "exp1-1"
    proc = tpu("ssh", *Z, "--num_slices=2", "--slice=2", "--dry_run")
    assert proc.returncode == 2 and "--slice=2" in proc.stderr and "Traceback" not in proc.stderr
