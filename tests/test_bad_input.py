"""Bad input gets a clear error naming the problem and the fix, not a library traceback:
an unknown gin binding, a missing gin file, a missing data path, an empty corpus, a corrupt shard.
Each runs the real entry point (`experiments.pretrain_ntp.main`) in-process."""

import glob
import gzip
import shutil

import gin
import pytest

from experiments import pretrain_ntp
from tests.conftest import TINY


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
