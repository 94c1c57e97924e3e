"""On-policy distillation (GKD) on two CPU processes (jax.distributed on loopback, gloo
collectives), each reading its own slice of the data: the same samples and the same losses as
one process with the same global batch."""

import os
import subprocess
import sys

import numpy as np
import pytest

from llm.distill.on_policy import OnPolicy, is_on_policy
from llm.train.metrics import read_metrics
from tests.conftest import REPO, run_experiment
from tests.distill.test_distill_run import distill_args
from tests.train.test_multiprocess import free_port

pytestmark = pytest.mark.slow

SEED, STEPS = 2, 4


def test_on_policy_two_processes_match_one_process(tiny_run, tmp_path):
    # Seed 2 at fraction 0.5 puts steps 1 and 4 on the student's samples, 2 and 3 on data.
    on = [is_on_policy(OnPolicy(fraction=0.5), SEED, s) for s in range(STEPS)]
    assert on == [True, False, False, True]
    extra = ["--gin_param=OnPolicy.fraction=0.5", "--gin_param=OnPolicy.prompt_len=16",
             "--gin_param=DistillLoss.divergence='jsd'", "--gin_param=DistillLoss.alpha=0.5",
             f"--gin_param=TrainConfig.seed={SEED}", f"--gin_param=TrainConfig.steps={STEPS}",
             "--gin_param=make_dataset.num_streams=2", "--gin_param=TrainConfig.eval_batches=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_experiment("experiments.distill", distill_args(tiny_run, str(one), *extra))

    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "", "LLM_COORDINATOR": f"127.0.0.1:{port}",
               "LLM_NUM_PROCESSES": "2", "LLM_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.distill",
             *distill_args(tiny_run, str(two), *extra)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    a = read_metrics(str(one / "metrics.jsonl"))
    b = read_metrics(str(two / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    # The sampled rows are identical: the target-token count of a sampled batch depends on where
    # each sample stopped (EOS), and it is equal at every step.
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    hard = [r["hard_loss"] for r in a]
    assert hard[0] == 0.0 and hard[3] == 0.0 and hard[1] > 0 and hard[2] > 0  # really on-policy
    # 2 devices on 2 processes vs 1 device: the same math, other reduction orders.
    for key in ("loss", "divergence", "hard_loss"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=0, atol=1e-5,
                                   err_msg=key)
    assert '"processes": 2' in (two / "manifest.json").read_text()
