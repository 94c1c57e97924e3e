"""Two CPU processes on loopback (jax.distributed, gloo collectives), each reading its own slice
of the data, train to the same losses as one process with the same global batch."""


import numpy as np
import pytest

from llm.train.metrics import read_metrics
from tests.conftest import TINY, finish_processes, launch_processes, run_experiment

pytestmark = pytest.mark.slow


def test_two_processes_match_one_process(tiny_data, tmp_path):
    def args(run_dir):
        return [*TINY, f"--gin_param=pretrain.data_dir='{tiny_data}'",
                f"--gin_param=pretrain.run_dir='{run_dir}'",
                "--gin_param=pretrain.sample_prompt=''", "--gin_param=TrainConfig.steps=5",
                "--gin_param=make_dataset.num_streams=2"]

    run_experiment("experiments.pretrain_ntp", args(tmp_path / "one"))

    finish_processes(launch_processes("experiments.pretrain_ntp", args(tmp_path / "two")))

    one = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    two = read_metrics(str(tmp_path / "two" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    assert all(r["tokens"] == one[0]["tokens"] for r in two)  # same global batch size
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one],
                               rtol=0, atol=1e-5)
    manifest = (tmp_path / "two" / "manifest.json").read_text()
    assert '"processes": 2' in manifest
