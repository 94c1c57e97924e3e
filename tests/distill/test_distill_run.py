"""experiments.distill end to end on the tiny teacher run (tests/conftest.py `tiny_run`): bad
vocabularies through the real entry point (exit 2, one line), offline top-k rows equal to the
batches and teacher logits they stand for, and a SIGKILL mid-run (with on-policy sampling on)
resuming bit for bit."""

import json
import os
import shutil
import signal

import gin
import numpy as np
import pytest

from experiments import distill
from llm.config import ConfigError
from llm.train.metrics import read_metrics
from tests.conftest import run_experiment

# A student of half the teacher's width and depth (tiny.gin's teacher: d_model 64, 2 layers).
STUDENT = ["--gin_param=ModelConfig.d_model=32", "--gin_param=ModelConfig.num_layers=1",
           "--gin_param=ModelConfig.num_heads=2", "--gin_param=ModelConfig.num_kv_heads=1",
           "--gin_param=ModelConfig.mlp_dim=64"]


def distill_args(teacher: str, run_dir: str, *extra: str) -> list[str]:
    return ["--gin_file=gin_configs/debug/tiny.gin", *STUDENT,
            f"--gin_param=distill.teacher_run='{teacher}'",
            f"--gin_param=distill.run_dir='{run_dir}'", "--gin_param=TrainConfig.steps=6",
            "--gin_param=checkpoint_manager.save_every=3",
            "--gin_param=make_dataset.shuffle_window=8",
            "--gin_param=peak_flops.per_device=1e11", *extra]


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_student_vocabulary_mismatch_is_one_line(tiny_run, tmp_path, capsys, clean_gin):
    # Through the debug config (so it is also checked to parse), teacher and run_dir replaced.
    code = distill.main(["--gin_file=gin_configs/debug/distill_tiny.gin",
                         f"--gin_param=distill.teacher_run='{tiny_run}'",
                         f"--gin_param=distill.run_dir='{tmp_path / 'run'}'",
                         "--gin_param=ModelConfig.vocab_size=256"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("distill: error: ") and "Traceback" not in err
    assert "vocabulary size 512" in err and "has 256" in err and "ModelConfig.vocab_size" in err
    assert not os.path.exists(tmp_path / "run")  # nothing was written


def test_data_with_another_tokenizer_is_one_line(tiny_run, tiny_data, tmp_path, capsys,
                                                 clean_gin):
    other = tmp_path / "other_data"
    shutil.copytree(tiny_data, other)
    with open(other / "dataset.json") as f:
        info = json.load(f)
    info["vocab_size"] = 600
    with open(other / "dataset.json", "w") as f:
        json.dump(info, f)
    with open(other / info["tokenizer"], "ab") as f:
        f.write(b"another tokenizer")
    code = distill.main(distill_args(tiny_run, str(tmp_path / "run"),
                                     f"--gin_param=distill.data_dir='{other}'"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "512" in err and "600" in err and "teacher" in err


def test_offline_rows_are_the_training_batches_with_the_teachers_topk(tiny_run, tiny_data,
                                                                      tmp_path):
    """`write_topk` + `topk_dataset`: each batch read back is the batch make_dataset yields for
    the same seed, with the teacher's top-k logits of exactly those rows (recomputed here)."""
    import jax

    from llm.data.pipeline import make_dataset
    from llm.distill import offline
    from llm.model import transformer
    from llm.runs import load_run

    teacher = load_run(tiny_run)
    k, seq, rows = 8, 64, 4
    meta = offline.settings(tiny_run, teacher.step, tiny_data, "fp", k=k, seq_len=seq,
                            global_batch_size=rows, seed=3, num_batches=2, vocab_size=512)
    offline.write_topk(str(tmp_path), graphdef=teacher.graphdef, params=teacher.params,
                       meta=meta)
    assert offline.check_reusable(str(tmp_path), meta)
    size = os.path.getsize(tmp_path / "topk-00000-of-00001.array_record")
    assert size >= 2 * rows * seq * offline.bytes_per_token(k, 512)
    with pytest.raises(ConfigError, match="k=8"):
        offline.check_reusable(str(tmp_path), {**meta, "k": 16})
    got = iter(offline.topk_dataset(str(tmp_path), global_batch_size=rows))
    want = iter(make_dataset(tiny_data, "train", seq_len=seq, global_batch_size=rows, seed=3))
    for _ in range(2):
        g, w = next(got), next(want)
        for name in ("inputs", "targets", "segment_ids", "positions", "loss_mask"):
            np.testing.assert_array_equal(g[name], w[name])
        logits = transformer.apply(teacher.graphdef, teacher.params, w["inputs"],
                                   positions=w["positions"], segment_ids=w["segment_ids"])
        values, indices = jax.lax.top_k(logits, k)
        np.testing.assert_allclose(g["topk_values"], values, atol=1e-5)
        np.testing.assert_array_equal(g["topk_indices"], indices)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tiny_run, tmp_path):
    """Online teacher, JSD, half the steps on-policy (student samples scored by the teacher):
    killed right after the step-3 checkpoint, the resumed run's losses equal an uninterrupted
    run's at every step, and so does the final evaluation."""
    extra = ["--gin_param=DistillLoss.divergence='jsd'", "--gin_param=DistillLoss.alpha=0.5",
             "--gin_param=DistillLoss.temperature=2.0", "--gin_param=OnPolicy.fraction=0.5",
             "--gin_param=OnPolicy.prompt_len=16"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    run_experiment("experiments.distill", distill_args(tiny_run, straight, *extra))
    killed = run_experiment("experiments.distill", distill_args(
        tiny_run, broken, *extra, "--gin_param=TrainConfig.fault_injection='sigkill_after_save:3'"),
        check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_experiment("experiments.distill", distill_args(tiny_run, broken, *extra))
    assert "resumed from step 3" in resumed.stdout

    def records(run_dir):
        return read_metrics(os.path.join(run_dir, "metrics.jsonl"))

    a, b = records(straight), records(broken)
    assert [r["step"] for r in a] == list(range(1, 7))
    keys = ("loss", "divergence", "hard_loss", "grad_norm", "tokens")
    assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]
    assert any(r["hard_loss"] == 0.0 for r in a)  # some steps really were on-policy
    with open(os.path.join(straight, "eval.json")) as f, \
            open(os.path.join(broken, "eval.json")) as g:
        assert json.load(f)["loss"] == json.load(g)["loss"]
