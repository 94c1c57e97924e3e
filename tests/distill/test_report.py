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


def fake_arm(path, curve, loss, mode="online", fraction=0.0, teacher=1.5):
    run = fake_run(path, curve, teacher)
    record = {"mode": mode, "loss": {"divergence": "forward_kl", "temperature": 1.0,
                                     "alpha": 0.0, "beta": 0.5, **loss},
              "on_policy": {"fraction": fraction}, **({"top_k": 32} if mode == "offline" else {})}
    with open(os.path.join(run, "manifest.json"), "w") as f:
        json.dump({"distill": record}, f)
    return run


def test_arms_are_grouped_labelled_and_paired_by_seed(tmp_path, capsys):
    for seed, (sc, kd, gkd) in enumerate([(2.5, 2.2, 2.1), (2.7, 2.3, 2.3)]):
        fake_arm(tmp_path / f"scratch_seed{seed}", [(50, 3.0), (100, sc)], {"alpha": 1.0})
        fake_arm(tmp_path / f"fkl_hard_seed{seed}", [(50, 2.9), (100, kd)], {"alpha": 0.5})
        if seed == 0:
            fake_arm(tmp_path / f"gkd_seed{seed}", [(50, 2.8), (100, gkd)],
                     {"divergence": "jsd"}, fraction=0.5)
    os.makedirs(tmp_path / "unfinished_seed0")  # no eval.json: left out
    out = str(tmp_path / "report" / "arms")
    assert distill_report.main(["--arms_dir", str(tmp_path), "--out", out]) == 0
    with open(out + ".json") as f:
        rows = {r["arm"]: r for r in json.load(f)["arms"]}
    assert set(rows) == {"scratch", "fkl_hard", "gkd"}
    assert rows["fkl_hard"]["delta_vs_baseline"] == pytest.approx([-0.3, -0.4])
    assert rows["fkl_hard"]["mean_delta"] == pytest.approx(-0.35)
    assert rows["gkd"]["delta_vs_baseline"] == pytest.approx([-0.4])
    assert rows["fkl_hard"]["label"] == "forward KL + 0.5 x hard labels"
    assert rows["gkd"]["label"] == "JSD (beta 0.5), on-policy 0.5 (GKD)"
    assert os.path.getsize(out + ".png") > 1000
    table = capsys.readouterr().out
    assert "| forward KL + 0.5 x hard labels | 2 | 2.2000 / 2.3000 | 2.2500 | -0.3500 |" in table
    assert distill_report.main(["--arms_dir", str(tmp_path), "--baseline", "nope",
                                "--out", out]) == 2
    assert "nope" in capsys.readouterr().err
