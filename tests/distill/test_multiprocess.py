"""On-policy distillation (GKD) on two CPU processes (jax.distributed on loopback, gloo
collectives), each reading its own slice of the data: the same samples and the same losses as
one process with the same global batch."""


import numpy as np
import pytest

from llm.distill.on_policy import OnPolicy, is_on_policy
from llm.train.metrics import read_metrics
from tests.conftest import finish_processes, launch_processes, run_experiment
from tests.distill.test_distill_run import distill_args

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

    two_args = distill_args(tiny_run, str(two), *extra)
    finish_processes(launch_processes("experiments.distill", two_args))

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
