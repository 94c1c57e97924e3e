"""End to end: `experiments.pretrain_mlm` on the tiny configs (real stdlib text) learns, keeps the
run-directory contract, resumes bit for bit after SIGKILL, and rejects impossible settings; and
`experiments.pretrain_ntp` trains a prefix LM when asked."""

import json
import os
import signal

import gin
import pytest

from llm.train.metrics import read_metrics
from tests.conftest import TINY, run_experiment

pytestmark = pytest.mark.slow

DATA = TINY[1:]  # the corpus bindings; the gin file is ours


def args(config: str, run_dir: str, data_dir: str, *extra: str) -> list[str]:
    return [f"--gin_file=gin_configs/debug/{config}.gin", *DATA,
            f"--gin_param=pretrain_mlm.data_dir='{data_dir}'",
            f"--gin_param=pretrain_mlm.run_dir='{run_dir}'",
            "--gin_param=peak_flops.per_device=1e11", *extra]  # skip measuring the CPU


def losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def assert_run_directory(run_dir: str, steps: int, objective: str) -> dict:
    for name in ("manifest.json", "config.gin", "metrics.jsonl", "eval.json", "plots/loss.png"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert str(steps) in os.listdir(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, "manifest.json")) as f:
        assert json.load(f)["objective"] == objective
    assert len(losses(run_dir)) == steps
    with open(os.path.join(run_dir, "eval.json")) as f:
        return json.load(f)


def test_bert_mlm_beats_the_unigram_baseline(tiny_data, tmp_path):
    run_dir = str(tmp_path)
    proc = run_experiment("experiments.pretrain_mlm", args(
        "mlm_bert_tiny", run_dir, tiny_data, "--gin_param=TrainConfig.steps=400",
        "--gin_param=checkpoint_manager.save_every=200"))
    result = assert_run_directory(run_dir, 400, "bert_mlm")
    print(f"\nBERT MLM, 400 steps: validation masked-token accuracy {result['accuracy']:.4f} "
          f"(unigram baseline {result['unigram_accuracy']:.4f}), loss {result['loss']:.4f} "
          f"(unigram {result['unigram_loss']:.4f}) on {int(result['masked_tokens'])} masked "
          "tokens")
    assert result["accuracy"] > result["unigram_accuracy"] + 0.05
    assert result["loss"] < result["unigram_loss"] - 0.3
    # ~15 % of the validation tokens are scored.
    assert 0.12 < result["masked_fraction"] < 0.18
    demo = proc.stdout.split("pretrain_mlm: demo")[1]
    assert "[MASK]" in demo and "[[" in demo
    print(demo)


@pytest.fixture(scope="module")
def span_run(tiny_data, tmp_path_factory) -> tuple[str, str]:
    run_dir = str(tmp_path_factory.mktemp("span"))
    proc = run_experiment("experiments.pretrain_mlm", args(
        "mlm_t5_tiny", run_dir, tiny_data, "--gin_param=TrainConfig.steps=60",
        "--gin_param=checkpoint_manager.save_every=30"))
    return run_dir, proc.stdout


def test_span_corruption_learns(span_run):
    run_dir, stdout = span_run
    result = assert_run_directory(run_dir, 60, "span_corruption")
    first = losses(run_dir)[0]
    print(f"\nspan corruption, 60 steps: first training loss {first:.4f}, validation denoising "
          f"loss {result['denoising_loss']:.4f}, token accuracy {result['accuracy']:.4f}, "
          f"exact-span accuracy {result['exact_span_accuracy']:.4f} over "
          f"{int(result['spans'])} spans")
    assert result["denoising_loss"] < first - 1.5
    assert 0.0 <= result["exact_span_accuracy"] <= 1.0 and result["spans"] > 100
    demo = stdout.split("pretrain_mlm: demo")[1]
    assert "<extra_id_0>" in demo and "[[" in demo
    print(demo)


def test_span_corruption_resumes_bit_for_bit(span_run, tiny_data, tmp_path):
    straight, _ = span_run
    run_dir = str(tmp_path)
    common = ["--gin_param=TrainConfig.steps=60", "--gin_param=checkpoint_manager.save_every=30"]
    killed = run_experiment("experiments.pretrain_mlm", args(
        "mlm_t5_tiny", run_dir, tiny_data, *common,
        "--gin_param=TrainConfig.fault_injection='sigkill_after_save:30'"), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_experiment("experiments.pretrain_mlm",
                             args("mlm_t5_tiny", run_dir, tiny_data, *common))
    assert "resumed from step 30" in resumed.stdout
    assert losses(run_dir) == losses(straight)  # same floats, every step
    with open(os.path.join(run_dir, "eval.json")) as a, \
            open(os.path.join(straight, "eval.json")) as b:
        assert json.load(a) == json.load(b)


def test_prefix_lm_is_selectable_in_pretrain_ntp(tiny_data, tmp_path):
    run_dir = str(tmp_path)
    run_experiment("experiments.pretrain_ntp", [
        *TINY, f"--gin_param=pretrain.data_dir='{tiny_data}'",
        f"--gin_param=pretrain.run_dir='{run_dir}'", "--gin_param=pretrain.sample_prompt=''",
        "--gin_param=get_objective.name='prefix_lm'", "--gin_param=TrainConfig.steps=6",
        "--gin_param=peak_flops.per_device=1e11"])
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    with open(os.path.join(run_dir, "manifest.json")) as f:
        assert json.load(f)["objective"] == "prefix_lm"
    # Only suffixes are scored: fewer target tokens than the 8 x 64 of next-token rows.
    assert all(r["tokens"] < 8 * 64 * 0.8 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_bad_settings_name_both_numbers(tiny_data, tmp_path):
    from experiments import pretrain_mlm
    from llm.config import ConfigError, parse_gin

    gin.clear_config()
    try:
        parse_gin(["gin_configs/debug/mlm_t5_tiny.gin"],
                  [a.split("=", 1)[1] for a in DATA] + [
                      f"pretrain_mlm.data_dir='{tiny_data}'",
                      f"pretrain_mlm.run_dir='{tmp_path}'", "pretrain_mlm.extra_ids=2"])
        with pytest.raises(ConfigError, match=r"needs 3 sentinel ids.*only 2 extra ids"):
            pretrain_mlm.pretrain_mlm()
        with gin.unlock_config():
            gin.bind_parameter("pretrain_mlm.extra_ids", 8)
            gin.bind_parameter("TrainConfig.seq_len", 8)
        with pytest.raises(ConfigError, match=r"seq_len=8 is too short.*seq_len >= 10"):
            pretrain_mlm.pretrain_mlm()
        with gin.unlock_config():
            gin.bind_parameter("TrainConfig.seq_len", 64)
            gin.bind_parameter("get_objective.name", "prefix_lm")
        with pytest.raises(ConfigError, match="pretrain_ntp"):
            pretrain_mlm.pretrain_mlm()
    finally:
        gin.clear_config()
    assert not os.listdir(tmp_path)  # nothing was trained or written
