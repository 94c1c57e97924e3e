"""DPO through experiments.rlhf end to end on the tiny pretrained run, trained on pairs exported
from a human-review database (`tools.review pairs`), with LoRA adapters (the
full-parameter step is the shared train_step, tested in test_dpo_sharding.py): the run directory
contract, a held-out implicit-reward accuracy that rises from 1/2, and a run directory that
`load_run` opens (base + adapters)."""

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
        "--gin_param=checkpoint_manager.save_every=4", "--gin_param=LoraConfig.enabled=True",
        "--gin_param=learning_rate_schedule.peak=1e-2", "--gin_param=peak_flops.per_device=1e11",
        *extra]


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
    assert result["train_pairs"] == 64  # 32 reviewed items x 2 reviewers' ratings
    assert result["heldout_initial"]["accuracy"] == 0.5  # the policy starts at the reference
    assert result["heldout_initial"]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert result["heldout"]["accuracy"] > 0.75 and result["heldout"]["loss"] < np.log(2)
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
    """SIGKILL right after the step-4 checkpoint, then the same command: the same metrics and
    the same adapters at step 8 as the uninterrupted run."""
    import orbax.checkpoint as ocp

    full, tiny_run = dpo_run
    run_dir = str(tmp_path / "killed")
    proc = run_experiment("experiments.rlhf", dpo_args(
        tiny_run, tmp_path, run_dir, "--gin_param=TrainConfig.fault_injection="
        "'sigkill_after_save:4'"), check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_experiment("experiments.rlhf", dpo_args(tiny_run, tmp_path, run_dir))
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
