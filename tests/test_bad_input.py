"""Bad input gets a clear error naming the problem and the fix, not a library traceback:
an unknown gin binding, a missing gin file, a missing data path, an empty corpus, a corrupt shard,
and the table of bad values below (exit code 2, one `<tool>: error:` line, no traceback).

Most run the real entry point (`experiments.pretrain_ntp.main`, what `python -m` calls)
in-process; the last ones run `python -m ...` in a subprocess (several devices, checkpoints, the
data tools)."""

import glob
import gzip
import json
import os
import shutil

import gin
import pytest

from experiments import pretrain_ntp
from tests.conftest import TINY, run_experiment, tiny_run_args


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def run(capsys, *args: str) -> str:
    assert pretrain_ntp.main([*args]) == 2
    return capsys.readouterr().err


def test_unknown_parameter_names_it_and_the_valid_ones(capsys):
    err = run(capsys, "--gin_param=ModelConfig.dmodel=64")
    assert "unknown parameter 'dmodel' of ModelConfig" in err
    assert "Did you mean 'd_model'?" in err and "num_layers" in err


def test_unknown_configurable_suggests_close_names(capsys):
    err = run(capsys, "--gin_param=TrainConfg.steps=3")
    assert "unknown configurable 'TrainConfg'" in err and "'TrainConfig'" in err


def test_missing_gin_file(capsys):
    err = run(capsys, "--gin_file=gin_configs/nope.gin")
    assert "gin file 'gin_configs/nope.gin' does not exist" in err


def test_missing_data_path(capsys, tmp_path):
    err = run(capsys, "--gin_param=corpus.name='files'",
              f"--gin_param=text_files.pattern='{tmp_path}/missing/*.txt'",
              f"--gin_param=pretrain.data_dir='{tmp_path}/data'")
    assert "No files match" in err and "text_files.pattern" in err


def test_empty_corpus(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt") as f:
        f.write("\n")
    err = run(capsys, "--gin_param=corpus.name='jsonl'", f"--gin_param=jsonl.path='{empty}'",
              f"--gin_param=pretrain.data_dir='{tmp_path}/data'")
    assert "yielded no documents" in err and "corpus.name" in err


def test_corrupt_shard(capsys, tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted(glob.glob(str(data / "train-*.array_record")))[0]
    with open(shard, "r+b") as f:  # a partial copy: the second half of the file is gone
        f.truncate(f.seek(0, 2) // 2)
    err = run(capsys, *TINY, f"--gin_param=pretrain.data_dir='{data}'",
              f"--gin_param=pretrain.run_dir='{tmp_path}/run'")
    assert shard.split("/")[-1] in err and "prepare_data" in err


def test_non_finite_loss_stops_the_run_naming_the_step(capsys, tmp_path, tiny_data):
    err = run(capsys, *TINY, f"--gin_param=pretrain.data_dir='{tiny_data}'",
              f"--gin_param=pretrain.run_dir='{tmp_path}/run'",
              "--gin_param=learning_rate_schedule.peak=1e9",
              "--gin_param=make_optimizer.clip_norm=None",
              "--gin_param=checkpoint_manager.save_every=1000")
    assert "Loss became" in err and "at step" in err and "learning_rate_schedule.peak" in err
    step = int(err.split("at step ")[1].split()[0])
    assert 1 <= step <= 12


# ---------------------------------------------------------------------------------------------
# The table: one bad value per row, through the experiment's `main` (what `python -m` runs).
# Each must exit 2 with one `<tool>: error:` line naming the binding, the value and the fix.
# All but the last rows fail before anything is compiled.
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    # (id, extra arguments, words the message must contain)
    ("choice", ["--gin_param=ModelConfig.norm='batchnorm'"],
     ["ModelConfig.norm='batchnorm'", "'rmsnorm', 'layernorm'"]),
    ("unquoted_string", ["--gin_param=ModelConfig.dtype=bfloat16"],
     ["--gin_param=ModelConfig.dtype=bfloat16", "needs quotes", "ModelConfig.dtype='bfloat16'"]),
    ("string_for_int", ["--gin_param=TrainConfig.steps='100'"],
     ["TrainConfig.steps='100'", "takes an integer", "Remove the quotes"]),
    ("string_for_float", ["--gin_param=learning_rate_schedule.peak='fast'"],
     ["learning_rate_schedule.peak='fast'", "takes a number"]),
    ("float_for_int", ["--gin_param=ModelConfig.d_model=64.5"],
     ["ModelConfig.d_model=64.5", "takes an integer"]),
    ("typo_in_gin_param", ["--gin_param=TrainConfig.stepz=5"],
     ["'stepz'", "Did you mean 'steps'?", "(in --gin_param=TrainConfig.stepz=5)"]),
    ("negative_steps", ["--gin_param=TrainConfig.steps=0"], ["TrainConfig.steps=0", ">= 1"]),
    ("accum_steps", ["--gin_param=TrainConfig.accum_steps=3"],
     ["TrainConfig.global_batch_size=8", "TrainConfig.accum_steps=3"]),
    ("heads_vs_width", ["--gin_param=ModelConfig.num_heads=3",
                        "--gin_param=ModelConfig.num_kv_heads=1"],
     ["ModelConfig.d_model=64", "num_heads=3", "head_dim"]),
    ("kv_heads", ["--gin_param=ModelConfig.num_kv_heads=3"],
     ["ModelConfig.num_heads=4", "num_kv_heads=3"]),
    ("seq_len_over_positions", ["--gin_param=ModelConfig.position='learned'",
                                "--gin_param=ModelConfig.max_seq_len=32"],
     ["TrainConfig.seq_len=64", "ModelConfig.max_seq_len=32", "at least 64"]),
    ("objective", ["--gin_param=get_objective.name='gpt'"],
     ["get_objective.name='gpt'", "'next_token'"]),
    ("objective_for_other_experiment", ["--gin_param=get_objective.name='bert_mlm'"],
     ["'bert_mlm'", "pretrain_mlm"]),
    ("fsdp_tp_mesh_on_one_device", ["--gin_file=gin_configs/mesh/fsdp_tp.gin"],
     ["make_mesh(data=1, fsdp=-1, tensor=2)", "1 cpu device", "gin_configs/mesh/dp.gin"]),
    ("num_streams", ["--gin_param=make_dataset.num_streams=3"],
     ["TrainConfig.global_batch_size=8", "make_dataset.num_streams=3"]),
    ("fault_injection", ["--gin_param=TrainConfig.fault_injection='kill:3'"],
     ["TrainConfig.fault_injection='kill:3'", "sigkill_after_save:N"]),
    # Found at trace time (before XLA compiles the step): the CPU test of the cudnn path.
    ("cudnn_on_cpu", ["--gin_param=ModelConfig.attention_impl='cudnn'"],
     ["ModelConfig.attention_impl='cudnn'", "NVIDIA GPU", "'xla'"]),
]


def one_error_line(err: str, tool: str) -> str:
    """The error line; asserts there is exactly one and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{tool}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, words", [c[1:] for c in BAD_VALUES],
                         ids=[c[0] for c in BAD_VALUES])
def test_bad_value_is_one_clear_line(capsys, tmp_path, tiny_data, args, words):
    err = run(capsys, *TINY, f"--gin_param=pretrain.data_dir='{tiny_data}'",
              f"--gin_param=pretrain.run_dir='{tmp_path}/run'", *args)
    line = one_error_line(err, "pretrain_ntp")
    for w in words:
        assert w in line, line


def test_bad_value_in_gin_file_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin_configs/debug/tiny.gin'\nModelConfig.dtype = bfloat16\n")
    line = one_error_line(run(capsys, f"--gin_file={bad}"), "pretrain_ntp")
    assert f"{bad}, line 2" in line and "ModelConfig.dtype = 'bfloat16'" in line


def test_data_dir_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("not a directory")
    line = one_error_line(run(capsys, *TINY, f"--gin_param=pretrain.data_dir='{f}'"),
                          "pretrain_ntp")
    assert f"data_dir '{f}' is an existing file" in line and "pretrain.data_dir" in line


def test_missing_data_dir_says_it_prepares_there(capsys, tmp_path):
    """A missing data_dir is prepared from the configured corpus, and says so in one line first
    (the run then stops at a bad mesh, so nothing is compiled)."""
    assert pretrain_ntp.main([*TINY, f"--gin_param=pretrain.data_dir='{tmp_path}/nope'",
                              "--gin_file=gin_configs/mesh/tp.gin"]) == 2
    out, err = capsys.readouterr()
    assert "make_mesh" in one_error_line(err, "pretrain_ntp")
    first = out.splitlines()[0]
    assert f"{tmp_path}/nope does not exist; preparing corpus(name='files')" in first, first


def test_vocabulary_too_small_for_the_corpus(capsys, tmp_path):
    err = run(capsys, *TINY, f"--gin_param=pretrain.data_dir='{tmp_path}/data'",
              "--gin_param=prepare.vocab_size=270")
    line = one_error_line(err, "pretrain_ntp")
    assert "vocab_size=270" in line and "change `prepare.vocab_size`" in line


def test_mlm_bad_value(capsys, tmp_path, tiny_data):
    from experiments import pretrain_mlm

    assert pretrain_mlm.main(["--gin_file=gin_configs/debug/mlm_bert_tiny.gin",
                              *TINY[1:], f"--gin_param=pretrain_mlm.data_dir='{tiny_data}'",
                              "--gin_param=ModelConfig.position='alibi'"]) == 2
    line = one_error_line(capsys.readouterr().err, "pretrain_mlm")
    assert "ModelConfig.position='alibi'" in line and "'rope'" in line


# ---------------------------------------------------------------------------------------------
# Through `python -m` in a subprocess: exit status, stderr, and the multi-device cases.
# ---------------------------------------------------------------------------------------------

def cli(module: str, *args: str, env: dict | None = None) -> tuple[str, str]:
    proc = run_experiment(module, list(args), env=env, check=False, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout, proc.stderr


def test_cli_batch_not_divisible_over_data_axes(tmp_path, tiny_data):
    _, err = cli("experiments.pretrain_ntp", *TINY, f"--gin_param=pretrain.data_dir='{tiny_data}'",
                 f"--gin_param=pretrain.run_dir='{tmp_path}/run'",
                 "--gin_param=TrainConfig.global_batch_size=6",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    line = one_error_line(err, "pretrain_ntp")
    assert "TrainConfig.global_batch_size=6" in line and "4 batch shards" in line
    assert "multiple of 4" in line


def test_cli_prepare_data(tmp_path):
    _, err = cli("tools.prepare_data", f"--data_dir={tmp_path}/d",
                 "--gin_param=prepare.vocab_size='big'")
    assert "prepare.vocab_size='big'" in one_error_line(err, "prepare_data")
    f = tmp_path / "file"
    f.write_text("x")
    _, err = cli("tools.prepare_data", f"--data_dir={f}")
    assert "is an existing file" in one_error_line(err, "prepare_data")


def test_cli_curate(tmp_path):
    _, err = cli("tools.curate", f"--out_dir={tmp_path}/c", "--gin_param=curate.workers='2'")
    assert "curate.workers='2'" in one_error_line(err, "curate")
    _, err = cli("tools.curate", f"--out_dir={tmp_path}/c", "--gin_param=curate.runner='spark'")
    assert "curate.runner='spark'" in one_error_line(err, "curate")


def _damage(step_dir, how: str) -> None:
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(0 if how == "empty" else f.seek(0, 2) // 2)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_run, tiny_data):
    """A truncated latest checkpoint: a warning naming the step, the previous good checkpoint is
    restored, the run finishes with the same result as the uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    _damage(run_dir / "checkpoints" / "12", "truncate")
    proc = run_experiment("experiments.pretrain_ntp", tiny_run_args(run_dir, tiny_data))
    assert "Traceback" not in proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: checkpoint")]
    assert len(warning) == 1 and "step 12" in warning[0] and "resumed from step 9" in warning[0]
    assert "resumed from step 9 of 12" in proc.stdout
    assert sorted(os.listdir(run_dir / "corrupt_checkpoints"))[0].startswith("12-")
    with open(run_dir / "eval.json") as f, open(os.path.join(tiny_run, "eval.json")) as g:
        assert json.load(f)["loss"] == json.load(g)["loss"]


def test_no_readable_checkpoint(tmp_path, tiny_run, tiny_data):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    for step in ("6", "9", "12"):
        _damage(run_dir / "checkpoints" / step, "empty")
    _, err = cli("experiments.pretrain_ntp", *tiny_run_args(run_dir, tiny_data))
    line = one_error_line(err, "pretrain_ntp")
    assert "no checkpoint in" in line and "steps 12, 9, 6" in line and "move the directory" in line
