"""DPO through experiments.rlhf end to end on the tiny pretrained run, with LoRA adapters (the
full-parameter step is the shared train_step, tested in test_dpo_sharding.py), in two rounds:
round 0 on pairs exported from a human-review database (`tools.review pairs`), round 1 on pairs
sampled from the policy as round 0 left it (iterative DPO). Checked: the run directory contract,
a held-out implicit-reward accuracy that rises from 1/2, a run directory that `load_run` opens
(base + adapters), and a run killed in the middle of round 1 that resumes bit for bit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llm.train.metrics import read_metrics
from tests.conftest import run_experiment
from tests.posttrain.test_reward import code_pairs, review_export, write_pairs

pytestmark = pytest.mark.slow  # one more tiny experiment in a subprocess


def dpo_args(tiny_run, d, run_dir, *extra):
    train = review_export(d, code_pairs(32, seed=0))  # human feedback: tools.review pairs
    heldout = write_pairs(str(d / "heldout.jsonl"), code_pairs(16, seed=1))
    return [
        "--gin_file=gin_configs/debug/dpo_tiny.gin", f"--gin_param=rlhf.base_run='{tiny_run}'",
        f"--gin_param=rlhf.run_dir='{run_dir}'", f"--gin_param=DPOConfig.train_pairs='{train}'",
        f"--gin_param=DPOConfig.heldout_pairs='{heldout}'", "--gin_param=TrainConfig.steps=8",
        "--gin_param=TrainConfig.seq_len=64", "--gin_param=TrainConfig.eval_every=0",
        "--gin_param=checkpoint_manager.save_every=2", "--gin_param=LoraConfig.enabled=True",
        "--gin_param=learning_rate_schedule.peak=1e-2", "--gin_param=peak_flops.per_device=1e11",
        # round 1 (steps 5-8): 16 fresh addition prompts x 2 samples of the policy, longer wins
        "--gin_param=DPOConfig.rounds=2", "--gin_param=DPOConfig.eval_samples=0",
        "--gin_param=TaskPairs.task='addition'", "--gin_param=TaskPairs.train_prompts=16",
        "--gin_param=TaskPairs.reward='tests.posttrain.bad_rewards:length'",
        "--gin_param=TaskPairs.samples=2", "--gin_param=TaskPairs.max_new_tokens=8",
        "--gin_param=TaskPairs.temperature=1.0", "--gin_param=TaskPairs.batch_size=32",
        "--gin_param=TaskPairs.max_prompt_len=16", *extra]


@pytest.fixture(scope="module")
def dpo_run(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    run_dir = str(d / "run")
    run_experiment("experiments.rlhf", dpo_args(tiny_run, d, run_dir))
    return run_dir, tiny_run


def test_dpo_lora_run(dpo_run):
    run_dir, _ = dpo_run
    with open(os.path.join(run_dir, "eval.json")) as f:
        result = json.load(f)
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["algorithm"] == "dpo" and manifest["lora"]["trainable_params"] > 0
    assert result["step"] == 8 and result["heldout"]["pairs"] == 16
    assert result["round_train_pairs"][0] == 64  # 32 reviewed items x 2 reviewers' ratings
    assert result["rounds"] == 2 and 8 <= result["round_train_pairs"][1] <= 16
    # round 1's pairs: the policy's own samples, the longer completion chosen (recounted here)
    with open(os.path.join(run_dir, "pairs", "round1", "train.jsonl")) as f:
        round1 = [json.loads(line) for line in f]
    assert len(round1) == result["round_train_pairs"][1]
    assert all(len(p["chosen"]) > len(p["rejected"]) and p["prompt"].startswith(">>> ")
               for p in round1)
    assert result["heldout_initial"]["accuracy"] == 0.5  # the policy starts at the reference
    assert result["heldout_initial"]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    # round 0 (the human-feedback pairs) makes the held-out real code beat its shuffled words;
    # round 1 trains on unrelated pairs (longer gibberish wins) and keeps the policy above 1/2
    round0 = [r for r in read_metrics(os.path.join(run_dir, "eval_metrics.jsonl"))
              if r["step"] == 4]
    assert round0 and round0[0]["accuracy"] > 0.75 and round0[0]["loss"] < np.log(2)
    assert result["heldout"]["accuracy"] > 0.5 and result["heldout"]["loss"] < np.log(2)
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 9))
    assert {"loss", "accuracy", "chosen_reward", "rejected_reward", "reward_margin"} <= \
        set(records[-1])
    assert os.path.isfile(os.path.join(run_dir, "plots", "loss.png"))


def test_dpo_lora_run_loads_as_a_model(dpo_run):
    from llm.runs import load_run

    run_dir, base_dir = dpo_run
    run, base = load_run(run_dir), load_run(base_dir)
    assert run.step == 8 and run.cfg == base.cfg
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax_leaves(run.params), jax_leaves(base.params))]
    assert max(diffs) > 0  # the adapters moved the merged weights


def test_dpo_killed_run_resumes_bit_for_bit(dpo_run, tmp_path):
    """SIGKILL right after the step-6 checkpoint (the middle of round 1, whose pairs the killed
    process sampled), then the same command: it resumes inside round 1 on the pairs on disk,
    with the same metrics and the same adapters at step 8 as the uninterrupted run."""
    import orbax.checkpoint as ocp

    full, tiny_run = dpo_run
    run_dir = str(tmp_path / "killed")
    proc = run_experiment("experiments.rlhf", dpo_args(
        tiny_run, tmp_path, run_dir, "--gin_param=TrainConfig.fault_injection="
        "'sigkill_after_save:6'"), check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    round1 = os.path.join(run_dir, "pairs", "round1", "train.jsonl")
    with open(round1) as f:
        sampled = f.read()
    with open(os.path.join(full, "pairs", "round1", "train.jsonl")) as f:
        assert f.read() == sampled  # the same policy at step 4 sampled the same pairs
    proc = run_experiment("experiments.rlhf", dpo_args(tiny_run, tmp_path, run_dir))
    assert "resumed from step 6" in proc.stdout and "round 1" in proc.stdout
    with open(round1) as f:
        assert f.read() == sampled  # read back, not sampled again
    timing = ("step_time_s", "tokens_per_s", "mfu")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(read_metrics(os.path.join(run_dir, "metrics.jsonl"))) == \
        strip(read_metrics(os.path.join(full, "metrics.jsonl")))
    leaves = [jax_leaves(ocp.PyTreeCheckpointer().restore(
        os.path.join(r, "checkpoints", "8", "state"))["params"]) for r in (run_dir, full)]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
