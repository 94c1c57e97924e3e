"""Coordinated preemption: SIGTERM to one of two processes stops both after the same step, they
write one checkpoint and exit 0, and the relaunched run's loss curve equals an uninterrupted
two-process run bit for bit."""

import os
import signal
import subprocess
import sys
import time

import pytest

from llm.train.metrics import read_metrics
from tests.conftest import COMPILE_CACHE, REPO, TINY
from tests.train.test_multiprocess import free_port

pytestmark = pytest.mark.slow
STEPS = 40


def launch(run_dir, data_dir) -> list[subprocess.Popen]:
    port = free_port()
    args = [*TINY, f"--gin_param=pretrain.data_dir='{data_dir}'",
            f"--gin_param=pretrain.run_dir='{run_dir}'", "--gin_param=pretrain.sample_prompt=''",
            f"--gin_param=TrainConfig.steps={STEPS}",
            "--gin_param=checkpoint_manager.save_every=1000",
            "--gin_param=make_dataset.num_streams=2", "--gin_param=TrainConfig.eval_batches=1"]
    procs = []
    for pid in range(2):
        env = {**os.environ, **COMPILE_CACHE, "XLA_FLAGS": "",
               "LLM_COORDINATOR": f"127.0.0.1:{port}", "LLM_NUM_PROCESSES": "2",
               "LLM_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, "-m", "experiments.pretrain_ntp", *args],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def test_sigterm_to_one_process_stops_all_and_resumes_bitwise(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    finish(launch(straight, tiny_data))
    reference = losses(straight)
    assert len(reference) == STEPS

    run = tmp_path / "run"
    procs = launch(run, tiny_data)
    deadline = time.monotonic() + 300
    while len(losses(run)) < 3:  # training, past compilation
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one host's maintenance event
    outs = finish(procs)
    stopped = [int(o.split("stopped by signal at step ")[1].split(";")[0]) for o in outs]
    assert stopped[0] == stopped[1] < STEPS, outs  # process 0 was never signalled
    ckpt = run / "checkpoints"
    assert max(int(d) for d in os.listdir(ckpt) if d.isdigit()) == stopped[0]

    outs = finish(launch(run, tiny_data))
    assert f"resumed from step {stopped[0]}" in outs[0]
    assert losses(run) == reference  # bitwise, every step
