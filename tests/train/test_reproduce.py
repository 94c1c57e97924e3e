"""tools/reproduce.py on a real tiny run: N/N bitwise, a changed gin value named, data and
manifest errors as one line with exit code 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import COMPILE_CACHE, REPO

pytestmark = pytest.mark.slow


def reproduce(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **COMPILE_CACHE, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "tools/reproduce.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_tiny_run_reproduces_bitwise(tiny_run, tmp_path):
    proc = reproduce(tiny_run, "--out", str(tmp_path / "replay"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # All 12 steps of the tiny run (tests/conftest.py: TrainConfig.steps=12).
    assert "reproduced: 12/12 steps bitwise identical" in proc.stdout, proc.stdout
    assert "gin " not in proc.stdout  # no binding differs


def test_changed_gin_value_is_named_and_metrics_differ(tiny_run, tmp_path):
    proc = reproduce(tiny_run, "--steps", "3", "--out", str(tmp_path / "replay"),
                     "--gin_param=learning_rate_schedule.peak=0.002")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "differs: gin learning_rate_schedule.peak: 0.003 -> 0.002" in proc.stdout
    # Step 1 trains at lr 0 (warmup), so its loss matches; step 2 (lr = peak / 2) differs.
    assert ("not reproduced: 1/3 steps bitwise identical; first difference at step 2: "
            "learning_rate") in proc.stdout, proc.stdout


def test_changed_data_fingerprint_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["data"]["fingerprint"] = "0" * 16
    (run / "manifest.json").write_text(json.dumps(manifest))
    proc = reproduce(str(run))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "data fingerprint" in proc.stderr
    assert "--allow_data_change" in proc.stderr and "Traceback" not in proc.stderr


def test_run_dir_without_manifest(tmp_path):
    proc = reproduce(str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "no manifest.json" in proc.stderr
