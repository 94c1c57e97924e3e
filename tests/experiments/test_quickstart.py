"""The README's first command learns: the quickstart configuration, run in full on the embedded
corpus, ends with validation bits per byte below `gzip -9` on the same bytes (and far below the
unigram baseline), then samples. This is the suite's longest test (~6 min on an idle 2-core
machine). It is bounded by progress, not wall time: it fails only if the run prints nothing (the
progress bar advances every step) for 15 minutes, so a busy machine slows it down but does not
fail it."""

import json
import os

import pytest

from tests.conftest import run_experiment_watched

pytestmark = pytest.mark.slow


def test_quickstart_beats_gzip(tmp_path):
    proc = run_experiment_watched("experiments.pretrain_ntp", [
        "--gin_file=gin_configs/experiments/quickstart.gin",
        f"--gin_param=pretrain.run_dir='{tmp_path / 'run'}'",
        f"--gin_param=pretrain.data_dir='{tmp_path / 'data'}'"], stall_s=900)
    with open(tmp_path / "run" / "eval.json") as f:
        ev = json.load(f)
    print(json.dumps(ev, indent=2))  # the figures, in the test's output
    assert ev["step"] == 600
    assert ev["bits_per_byte"] < ev["gzip_bits_per_byte"]
    assert ev["bits_per_byte"] < 0.7 * ev["unigram_bits_per_byte"]
    assert "pretrain: sample" in proc.stdout
    assert os.path.exists(tmp_path / "run" / "plots" / "loss.png")
