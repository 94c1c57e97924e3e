"""tools/distill_report on hand-made run directories: the paired differences, the PNG and the
JSON record; unequal pairings are a one-line error."""

import json
import os

import pytest

from tools import distill_report


def fake_run(path, curve: list[tuple[int, float]], teacher: float | None = None) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "eval_metrics.jsonl"), "w") as f:
        for step, bpb in curve:
            f.write(json.dumps({"step": step, "bits_per_byte": bpb}) + "\n")
    with open(os.path.join(path, "eval.json"), "w") as f:
        json.dump({"step": curve[-1][0], "bits_per_byte": curve[-1][1],
                   "teacher_bits_per_byte": teacher}, f)
    return str(path)


def test_pairs_differences_and_outputs(tmp_path, capsys):
    kd = [fake_run(tmp_path / f"kd{i}", [(50, 3.0), (100, 2.0 + i / 10)], 1.5) for i in range(2)]
    sc = [fake_run(tmp_path / f"sc{i}", [(50, 3.1), (100, 2.25 + i / 10)]) for i in range(2)]
    out = str(tmp_path / "report" / "distill")
    assert distill_report.main(["--distilled", ",".join(kd), "--scratch", ",".join(sc),
                                "--out", out]) == 0
    with open(out + ".json") as f:
        summary = json.load(f)
    assert [p["delta"] for p in summary["pairs"]] == pytest.approx([-0.25, -0.25])
    assert summary["mean_delta"] == pytest.approx(-0.25)
    assert os.path.getsize(out + ".png") > 1000
    assert "| 100 | 2.0000 | 2.2500 | -0.2500 |" in capsys.readouterr().out


def test_unequal_pairing_is_an_error(tmp_path, capsys):
    kd = fake_run(tmp_path / "kd", [(50, 2.0)])
    assert distill_report.main(["--distilled", kd, "--scratch", f"{kd},{kd}",
                                "--out", str(tmp_path / "x")]) == 2
    assert "same number of runs" in capsys.readouterr().err
