"""experiments.reward end to end on the tiny pretrained run (trained on pairs exported from
human-review ratings), and its bad input through the CLI."""

from __future__ import annotations

import glob
import json
import math
import os
import random

import numpy as np
import pytest

from tests.conftest import STDLIB_EMAIL, run_experiment


def write_pairs(path: str, pairs: list[dict]) -> str:
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    return path


def code_pairs(n: int, seed: int) -> list[dict]:
    """chosen: 3 consecutive real lines of the email package; rejected: the same lines with
    their words shuffled (not Python any more)."""
    rng = random.Random(seed)
    lines = []
    for path in sorted(glob.glob(STDLIB_EMAIL)):
        with open(path, encoding="utf-8") as f:
            lines += [x.rstrip() for x in f if len(x.strip()) > 20]
    out = []
    for _ in range(n):
        i = rng.randrange(len(lines) - 3)
        text = "\n".join(lines[i:i + 3]) + "\n"
        words = text.split()
        rng.shuffle(words)
        out.append({"prompt": "", "chosen": text, "rejected": " ".join(words) + "\n"})
    return out


def reward_args(tiny_run, run_dir, train, heldout, *extra):
    return ["--gin_file=gin_configs/debug/reward_tiny.gin",
            f"--gin_param=reward.base_run='{tiny_run}'", f"--gin_param=reward.run_dir='{run_dir}'",
            f"--gin_param=reward.train_pairs='{train}'",
            f"--gin_param=reward.heldout_pairs='{heldout}'",
            "--gin_param=TrainConfig.steps=16", "--gin_param=TrainConfig.seq_len=64",
            "--gin_param=TrainConfig.eval_every=0", "--gin_param=checkpoint_manager.save_every=8",
            "--gin_param=learning_rate_schedule.peak=1e-3",
            "--gin_param=peak_flops.per_device=1e11", *extra]


def test_missing_chosen_is_one_line_exit_2(tmp_path):
    bad = write_pairs(str(tmp_path / "bad.jsonl"), [{"prompt": "p", "chosen": "a",
                                                     "rejected": "b"},
                                                    {"prompt": "p", "rejected": "b"}])
    proc = run_experiment("experiments.reward", reward_args(
        str(tmp_path / "no_base"), str(tmp_path / "rm"), bad, bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"reward: error: {bad}:2 has no 'chosen' field; a preference "
                                   "line needs 'chosen' and 'rejected' strings (and optionally "
                                   "'prompt').")
    assert not os.path.exists(tmp_path / "rm")  # nothing written


def review_export(d, pairs: list[dict]) -> str:
    """The training pairs as human feedback: a review database in which two reviewers each
    preferred the real code (system "sft") over the shuffled words ("base"), exported by the
    review tool's `pairs` command (aggregate "none": one pair per rating)."""
    from llm.eval import review
    from tools.review import write_pairs as export_pairs

    conn = review.connect(str(d / "review.sqlite"))
    review.add_items(conn, [{"id": f"i{k}", "prompt": p["prompt"], "system_a": "base",
                             "output_a": p["rejected"], "system_b": "sft",
                             "output_b": p["chosen"]} for k, p in enumerate(pairs)], "test")
    for k in range(len(pairs)):
        for reviewer in ("ann", "bob"):
            review.record(conn, f"i{k}", reviewer, "base", "B")  # right = sft
    conn.close()
    out = str(d / "train.jsonl")
    assert export_pairs(str(d / "review.sqlite"), out) == 2 * len(pairs)
    return out


@pytest.fixture(scope="module")
def reward_run(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("reward")
    train = review_export(d, code_pairs(32, seed=0))
    heldout = write_pairs(str(d / "heldout.jsonl"), code_pairs(24, seed=1))
    run_dir = str(d / "rm")
    proc = run_experiment("experiments.reward", reward_args(tiny_run, run_dir, train, heldout))
    return run_dir, heldout, proc


def test_reward_run_writes_the_contract_and_learns(reward_run):
    run_dir, _, proc = reward_run
    for name in ("manifest.json", "config.gin", "metrics.jsonl", "eval.json",
                 "plots/reward_model.png", "tb", "checkpoints/16"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "eval.json")) as f:
        result = json.load(f)
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["objective"] == "reward_model"
    assert manifest["reward_model"]["num_heldout"] == 24 and result["pairs"] == 24
    assert manifest["reward_model"]["num_train"] == 64  # 32 items x 2 reviewers
    assert result["step"] == 16
    # real code vs its shuffled words: the held-out pairs are ranked right far above chance
    assert result["accuracy"] >= 0.9 > result["initial_accuracy"] + 0.2, result
    assert result["loss"] < result["initial_loss"]
    assert "held-out pair accuracy" in proc.stdout
    # the 95% Wilson interval of the held-out accuracy, by hand: p +- z sqrt(...) around the
    # shifted centre (p + z^2 / 2n) / (1 + z^2 / n)
    n, z, p = 24, 1.959964, result["accuracy"]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert result["accuracy_lo"] == pytest.approx(centre - half, abs=1e-9)
    assert result["accuracy_hi"] == pytest.approx(centre + half, abs=1e-9)


def test_loaded_reward_model_scores_like_training(reward_run):
    """`reward_model.load(run_dir).score` on the held-out texts reproduces eval.json's accuracy
    and mean margin (the same rows, read at the same EOS)."""
    from llm.posttrain import pairs, reward_model

    run_dir, heldout, _ = reward_run
    rm = reward_model.load(run_dir)
    ps = pairs.read_pairs(heldout)
    chosen = rm.score([p.prompt for p in ps], [p.chosen for p in ps], batch_size=8)
    rejected = rm.score([p.prompt for p in ps], [p.rejected for p in ps], batch_size=8)
    with open(os.path.join(run_dir, "eval.json")) as f:
        result = json.load(f)
    assert np.mean(chosen > rejected) == pytest.approx(result["accuracy"])
    assert np.mean(chosen - rejected) == pytest.approx(result["mean_margin"], rel=1e-4, abs=1e-4)
