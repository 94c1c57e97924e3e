"""Coordinated preemption: SIGTERM to one of two processes stops both after the same step, they
write one checkpoint and exit 0, and the relaunched run's loss curve equals an uninterrupted
two-process run bit for bit."""

import os
import signal
import subprocess
import time

import pytest

from llm.train.metrics import read_metrics
from tests.conftest import TINY, finish_processes, launch_processes

pytestmark = pytest.mark.slow
STEPS = 40


def launch(run_dir, data_dir) -> list[subprocess.Popen]:
    args = [*TINY, f"--gin_param=pretrain.data_dir='{data_dir}'",
            f"--gin_param=pretrain.run_dir='{run_dir}'", "--gin_param=pretrain.sample_prompt=''",
            f"--gin_param=TrainConfig.steps={STEPS}",
            "--gin_param=checkpoint_manager.save_every=1000",
            "--gin_param=make_dataset.num_streams=2", "--gin_param=TrainConfig.eval_batches=1"]
    return launch_processes("experiments.pretrain_ntp", args)


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def test_sigterm_to_one_process_stops_all_and_resumes_bitwise(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    finish_processes(launch(straight, tiny_data))
    reference = losses(straight)
    assert len(reference) == STEPS

    run = tmp_path / "run"
    procs = launch(run, tiny_data)
    deadline = time.monotonic() + 300
    while len(losses(run)) < 3:  # training, past compilation
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one host's maintenance event
    outs = finish_processes(procs)
    stopped = [int(o.split("stopped by signal at step ")[1].split(";")[0]) for o in outs]
    assert stopped[0] == stopped[1] < STEPS, outs  # process 0 was never signalled
    ckpt = run / "checkpoints"
    assert max(int(d) for d in os.listdir(ckpt) if d.isdigit()) == stopped[0]

    outs = finish_processes(launch(run, tiny_data))
    assert f"resumed from step {stopped[0]}" in outs[0]
    assert losses(run) == reference  # bitwise, every step
