"""TrainConfig.profile_steps: a jax.profiler trace of the chosen steps lands in the run dir."""

import glob
import os

import pytest

from tests.conftest import run_experiment, tiny_run_args

pytestmark = pytest.mark.slow


def test_profile_steps_write_a_trace(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_experiment("experiments.pretrain_ntp", tiny_run_args(
        run_dir, tiny_data, "--gin_param=TrainConfig.steps=3",
        "--gin_param=TrainConfig.profile_steps=(2, 3)"))
    traces = glob.glob(str(run_dir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1, os.listdir(run_dir)
    with open(traces[0], "rb") as f:
        data = f.read()
    # The trace holds the annotated training steps and the jitted step's XLA program.
    assert b"train" in data and b"jit_traced" in data
    assert glob.glob(os.path.join(os.path.dirname(traces[0]), "perfetto_trace.json.gz"))


def test_bad_profile_steps_is_one_line(tiny_data, tmp_path):
    proc = run_experiment("experiments.pretrain_ntp", tiny_run_args(
        tmp_path / "run", tiny_data, "--gin_param=TrainConfig.profile_steps=(3, 2)"),
        check=False)
    assert proc.returncode == 2 and "TrainConfig.profile_steps=(3, 2)" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
