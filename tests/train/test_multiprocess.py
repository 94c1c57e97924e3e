"""Two CPU processes on loopback (jax.distributed, gloo collectives), each reading its own slice
of the data, train to the same losses as one process with the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from llm.train.metrics import read_metrics
from tests.conftest import REPO, TINY, run_experiment

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tiny_data, tmp_path):
    def args(run_dir):
        return [*TINY, f"--gin_param=pretrain.data_dir='{tiny_data}'",
                f"--gin_param=pretrain.run_dir='{run_dir}'",
                "--gin_param=pretrain.sample_prompt=''", "--gin_param=TrainConfig.steps=5",
                "--gin_param=make_dataset.num_streams=2"]

    run_experiment("experiments.pretrain_ntp", args(tmp_path / "one"))

    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "", "LLM_COORDINATOR": f"127.0.0.1:{port}",
               "LLM_NUM_PROCESSES": "2", "LLM_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.pretrain_ntp", *args(tmp_path / "two")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    one = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    two = read_metrics(str(tmp_path / "two" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    assert all(r["tokens"] == one[0]["tokens"] for r in two)  # same global batch size
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one],
                               rtol=0, atol=1e-5)
    manifest = (tmp_path / "two" / "manifest.json").read_text()
    assert '"processes": 2' in manifest
