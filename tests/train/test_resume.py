"""Reliability of a run: bitwise resume after SIGKILL (also mid-checkpoint-write), and a clean
checkpoint + exit 0 on SIGTERM. Each run is a real `experiments.pretrain_ntp` subprocess."""

import os
import signal
import subprocess
import sys
import time

import pytest

from llm.train.metrics import read_metrics
from tests.conftest import REPO, run_experiment, tiny_run_args

pytestmark = pytest.mark.slow


args = tiny_run_args


def losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def steps_on_disk(run_dir: str) -> list[int]:
    ckpt = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


@pytest.fixture(scope="module")
def straight(tiny_run) -> list[float]:
    out = losses(tiny_run)
    assert len(out) == 12 and out[-1] < out[0]
    return out


@pytest.mark.parametrize("fault, resumes_from", [("sigkill_after_save:6", {6}),
                                                 ("sigkill_during_save:9", {6, 9})])
def test_sigkill_then_resume_is_bitwise_identical(fault, resumes_from, straight, tiny_data,
                                                  tmp_path):
    run_dir = str(tmp_path)
    killed = run_experiment("experiments.pretrain_ntp",
                            args(run_dir, tiny_data, f"--gin_param=TrainConfig.fault_injection="
                                 f"'{fault}'"), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_experiment("experiments.pretrain_ntp", args(run_dir, tiny_data))
    start = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert start in resumes_from
    assert losses(run_dir) == straight  # bit for bit: same floats, every step
    assert steps_on_disk(run_dir)[-1] == 12


def test_sigterm_checkpoints_and_exits_zero(tiny_data, tmp_path):
    run_dir = str(tmp_path)
    cmd = [sys.executable, "-m", "experiments.pretrain_ntp",
           *args(run_dir, tiny_data, "--gin_param=TrainConfig.steps=100000",
                 "--gin_param=checkpoint_manager.save_every=1000")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while len(losses(run_dir)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    step = int(stdout.split("stopped by signal at step ")[1].split(";")[0])
    assert step >= 3 and steps_on_disk(run_dir)[-1] == step
    assert os.path.exists(metrics)
