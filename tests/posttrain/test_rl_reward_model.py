"""GRPO rewarded by a trained reward model (RLConfig.reward="rm:<run dir>"): every logged
training reward equals `reward_model.load(dir).score` of the same prompt and completion, the
held-out completions are also scored by a programmatic reward (RLConfig.eval_rewards), and a
directory that is not a reward model is a one-line error naming the setting."""

import json
import os

import numpy as np
import pytest

from llm.train.metrics import read_metrics
from tests.conftest import run_experiment
from tests.posttrain.test_reward import code_pairs, reward_args, write_pairs
from tests.posttrain.test_rlhf import LOADED, read_json, rl_args

pytestmark = pytest.mark.slow  # a reward model and an RL run, each a subprocess


@pytest.fixture(scope="module")
def rm_run(tiny_run, tmp_path_factory) -> str:
    """A reward model on the tiny run (real code over its shuffled words, 4 steps: only its
    scores matter here, not its accuracy)."""
    d = tmp_path_factory.mktemp("rl_rm")
    train = write_pairs(str(d / "train.jsonl"), code_pairs(16, seed=0))
    heldout = write_pairs(str(d / "heldout.jsonl"), code_pairs(8, seed=1))
    run_dir = str(d / "rm")
    run_experiment("experiments.reward", reward_args(tiny_run, run_dir, train, heldout,
                                                     "--gin_param=TrainConfig.steps=4",
                                                     "--gin_param=checkpoint_manager.save_every=4"))
    return run_dir


@pytest.fixture(scope="module")
def grpo_rm_run(tiny_run, rm_run, tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("grpo_rm"))
    run_experiment("experiments.rlhf", rl_args(
        "grpo_tiny", tiny_run, run_dir, "--gin_param=RLConfig.steps=2",
        f"--gin_param=RLConfig.reward='rm:{rm_run}'",
        "--gin_param=RLConfig.eval_rewards=('exact_partial',)",
        "--gin_param=RLConfig.sample_log_every=1"), timeout=LOADED)
    return run_dir


def test_rewards_are_the_reward_models_scores(grpo_rm_run, rm_run):
    from llm.posttrain import reward_model

    with open(os.path.join(grpo_rm_run, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4  # 2 prompts x 2 samples a step
    rm = reward_model.load(rm_run)
    # scored independently, one sample at a time: the loop's batched scores are the same
    expected = [float(rm.score([s["prompt"]], [s["completion"]], batch_size=1)[0])
                for s in samples]
    np.testing.assert_allclose([s["reward"] for s in samples], expected, rtol=0, atol=1e-5)
    assert len(set(expected)) > 1  # real, distinct scores (not a constant)
    for r in read_metrics(os.path.join(grpo_rm_run, "metrics.jsonl")):
        step_rewards = [s["reward"] for s in samples if s["step"] == r["step"]]
        assert r["reward"] == pytest.approx(np.mean(step_rewards), abs=1e-6)


def test_heldout_is_also_scored_by_the_task_reward(grpo_rm_run):
    result = read_json(os.path.join(grpo_rm_run, "eval.json"))
    for key in ("reward_policy", "reward_reference", "reward_exact_partial_policy",
                "reward_exact_partial_reference", "reward_exact_partial_gain"):
        assert np.isfinite(result[key]), key
    assert 0.0 <= result["reward_exact_partial_reference"] <= 1.0
    # reward-model scores are unbounded logits, not the task's [0, 1] credit
    assert result["reward_reference"] != result["reward_exact_partial_reference"]


@pytest.mark.parametrize("which", ["missing", "not_a_reward_model"])
def test_bad_reward_model_dir_is_one_line(which, tiny_run, tmp_path):
    rm_dir = str(tmp_path / "nothing") if which == "missing" else tiny_run
    proc = run_experiment("experiments.rlhf", rl_args(
        "grpo_tiny", tiny_run, str(tmp_path / "run"), f"--gin_param=RLConfig.reward='rm:{rm_dir}'"),
        check=False, timeout=LOADED)
    assert proc.returncode == 2, proc.stderr[-2000:]
    says = ("is not a run directory (no manifest.json)" if which == "missing"
            else "is not a reward model (its objective is ")
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, proc.stderr
    assert line.startswith(f"rlhf: error: RLConfig.reward='rm:{rm_dir}': ") and says in line
