"""The memorization audit on a real tiny run trained on data with canaries.

A 0.1M-parameter model (gin_configs/debug/tiny.gin) trained for 300 steps (~4 epochs) on the 53
lib2to3 fixer modules of this Python, with canaries at 1 and 64 repetitions: the 64-times canaries
must be far more exposed than the once-seen ones. Greedy extraction is checked against an
independent path: a window's 16-token greedy decode reproduces the document iff every suffix
token is the argmax under teacher forcing (LanguageModel.score_sequences' greedy flags).
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.conftest import run_experiment

FIXERS = os.path.join(os.path.dirname(os.__file__), "lib2to3", "fixes", "*.py")


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    if len(glob.glob(FIXERS)) < 40:
        pytest.skip(f"{FIXERS} not in this Python (lib2to3 was removed in 3.13)")
    root = tmp_path_factory.mktemp("canary")
    run_experiment("experiments.pretrain_ntp", [
        "--gin_file=gin_configs/debug/tiny.gin", "--gin_param=corpus.name='files'",
        f"--gin_param=text_files.pattern='{FIXERS}'", "--gin_param=prepare.validation_fraction=0.2",
        f"--gin_param=pretrain.data_dir='{root / 'data'}'",
        f"--gin_param=pretrain.run_dir='{root / 'run'}'", "--gin_param=pretrain.sample_prompt=''",
        "--gin_param=canaries.counts=[1, 64]", "--gin_param=canaries.per_count=2",
        "--gin_param=TrainConfig.steps=300", "--gin_param=TrainConfig.log_every=50",
        "--gin_param=checkpoint_manager.save_every=300",
        "--gin_param=learning_rate_schedule.peak=1e-2"])
    return str(root)


def test_canaries_in_shards(canary_run):
    from llm.data import canaries, shards
    from llm.data.tokenizer import load_tokenizer

    data = os.path.join(canary_run, "data")
    spec, cs = canaries.load(data)
    info = shards.load_dataset_info(data)
    assert info.settings["canaries"] == spec.settings()  # part of the fingerprint
    tok = load_tokenizer(info.tokenizer_path)
    docs = [tok.decode(d[:-1]) for d in shards.read_all(info.shard_paths("train"))]
    for c in cs:
        assert docs.count(c.text) == c.count  # each canary exactly `count` times in train
        assert c.secret not in "".join(
            tok.decode(d[:-1]) for d in shards.read_all(info.shard_paths("validation")))
    assert [c.count for c in cs] == [1, 1, 64, 64]


def test_exposure_rises_and_extraction(canary_run, tmp_path):
    proc = run_experiment("tools.memorization", [
        f"--run_dir={canary_run}/run", "--num_candidates=300", "--windows=48",
        "--prefix_len=16", "--suffix_len=16", f"--out_dir={tmp_path}"])
    result = json.loads((tmp_path / "memorization.json").read_text())
    assert (tmp_path / "memorization.png").stat().st_size > 1000
    by = {r["count"]: r for r in result["exposure"]["by_count"]}
    # 64 repetitions: far more exposed than 1 (both estimates).
    assert by[64]["exposure_extrapolated_mean"] > by[1]["exposure_extrapolated_mean"] + 3
    assert by[64]["exposure_sampled_mean"] > by[1]["exposure_sampled_mean"] + 1
    assert "exposure (bits" in proc.stdout

    from llm.data import shards
    from llm.eval import memorization
    from llm.eval.lm import LanguageModel
    from llm.runs import load_run

    run = load_run(f"{canary_run}/run")
    info = shards.load_dataset_info(run.manifest["data"]["data_dir"])
    docs = shards.read_all(info.shard_paths("train"))[:-130]  # less the 130 canary documents
    prefixes, suffixes, _, starts = memorization.extraction_windows(docs, 16, 16, 48, seed=0)
    stats, generated = memorization.greedy_extraction(run, prefixes, suffixes, starts)
    assert stats == {k: result["extraction"]["train"][k] for k in stats}
    lm = LanguageModel(run, batch_size=16, progress=False)
    rows = [(([0] if s == 0 else []) + p.tolist() + x.tolist(), 16)
            for p, x, s in zip(prefixes, suffixes, starts)]
    teacher = [bool(r[:, 1].all()) for r in lm.score_sequences(rows)]
    exact = [list(g) == x.tolist() for g, x in zip(generated, suffixes)]
    assert exact == teacher
    assert result["extraction"]["train"]["n"] == 48

    # The same audit as an `experiments.evaluate --tasks=memorization` task.
    from llm.eval import suite

    assert suite.resolve("memorization").run is memorization.task_result
    res = memorization.task_result(lm, num_candidates=50, num_windows=8)
    assert set(res["metrics"]) == {"exposure_extrapolated@1", "exposure_sampled@1",
                                   "exposure_extrapolated@64", "exposure_sampled@64",
                                   "extraction_rate_train", "extraction_rate_validation"}
    assert res["memorization"]["extraction"]["prefix_len"] == 31  # (seq_len 64 - BOS) // 2
    assert len(res["samples"]) == 4


def test_bad_input(canary_run, tmp_path, capsys):
    from tools import memorization as cli

    proc = run_experiment("tools.memorization", [
        f"--run_dir={canary_run}/run", "--prefix_len=40", "--suffix_len=40"], check=False)
    assert proc.returncode == 2 and "exceed the context" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for args, message in [([f"--run_dir={tmp_path}"], "not a run directory"),
                          ([f"--run_dir={canary_run}/run", "--num_candidates=3"], "out of range"),
                          ([f"--run_dir={canary_run}/run", "--step=7", "--prefix_len=16",
                            "--suffix_len=16"], "no checkpoint at step")]:
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(os.path.join(canary_run, "run", "eval", "memorization.json"))
