"""`python -m experiments.evaluate` on a real tiny run: files written, bad input rejected with one
line and nothing partial; and the lm-eval adapter against the native path (same numbers, and
per-sample log-likelihoods identical at --batch_size 1 and 7)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from experiments import evaluate
from tests.conftest import COMPILE_CACHE, REPO, run_experiment

F = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_out"))
    proc = run_experiment("experiments.evaluate", [
        f"--run_dir={tiny_run}", f"--out_dir={out}", "--max_length=128",
        f"--tasks={F}/tiny_mc.yaml,crows_pairs={F}/crows_pairs.csv,probes"])
    return out, proc


def test_writes_task_json_report_and_charts(evaluated):
    out, proc = evaluated
    for name in ("tiny_mc", "crows_pairs", "probes"):
        result = json.loads(read(os.path.join(out, f"{name}.json")))
        assert result["num_samples"] == len(result["samples"]) > 0
        assert all("stderr" in v for v in result["metrics"].values())
        assert os.path.getsize(os.path.join(out, "plots", f"{name}.png")) > 1000
    report = read(os.path.join(out, "report.md"))
    assert "## tiny_mc" in report and "| acc_norm |" in report and "hit_rate/role_play" in report
    assert "evaluate: tiny_mc: acc" in proc.stdout
    mc = json.loads(read(os.path.join(out, "tiny_mc.json")))
    # acc from the stored per-sample lls, recomputed here
    acc = sum(max(range(len(s["lls"])), key=s["lls"].__getitem__) == s["gold"]
              for s in mc["samples"]) / len(mc["samples"])
    assert mc["metrics"]["acc"]["value"] == pytest.approx(acc)


def _fails(args: list[str], match: str, out: str) -> None:
    proc = run_experiment("experiments.evaluate", [*args, f"--out_dir={out}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if "evaluate: error" in line]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(out, "report.md"))
    assert not glob.glob(os.path.join(out, "*.json"))


def test_bad_input_cli(tiny_run, tmp_path):
    out = str(tmp_path / "out")
    _fails([f"--run_dir={tiny_run}", "--tasks=helaswag"],
           "unknown task 'helaswag'; valid: probes, counterfactual", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x"], "gold": 0}\n{"context": \n')
    spec = tmp_path / "bad.yaml"
    spec.write_text("output_type: multiple_choice\ndata: bad.jsonl\n")
    _fails([f"--run_dir={tiny_run}", f"--tasks={spec}"], f"{bad}:2: malformed JSON", out)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("manifest.json", "config.gin"):
        shutil.copy(os.path.join(tiny_run, f), bare / f)
    _fails([f"--run_dir={bare}", f"--tasks={F}/tiny_mc.yaml"], "has no checkpoint", out)


def test_bad_input_in_process(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"context": "a", "choices": ["x", ""], "gold": 0}\n')
    (tmp_path / "empty.yaml").write_text("output_type: multiple_choice\ndata: empty.jsonl\n")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": "word " * 300, "choices": ["a", "b"], "gold": 0})
                    + "\n")
    (tmp_path / "long.yaml").write_text("output_type: multiple_choice\ndata: long.jsonl\n")
    for spec, match in (("empty.yaml", "line 1: empty choices"),
                        ("long.yaml", "task 'long': request 0: ")):
        code = evaluate.main([f"--run_dir={tiny_run}", f"--tasks={tmp_path / spec}",
                              f"--out_dir={out}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0], err
        assert not os.path.exists(out / "report.md")


@pytest.mark.slow
def test_lm_eval_adapter_matches_native(evaluated, tiny_run, tmp_path):
    pytest.importorskip("lm_eval")
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["purelib"],
                                       "llm_jax_lm_eval.pth")):
        pytest.fail("llm_jax is not registered with the lm_eval command: run "
                    "`python -m llm.eval.lm_eval_hook` (tools/setup_env.sh does).")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc_lm.yaml").write_text(f"""task: tiny_mc_lm
dataset_path: json
dataset_kwargs:
  data_files:
    test: {F}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    per_batch = {}
    lm_eval_bin = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    offline = {**os.environ, **COMPILE_CACHE, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": REPO}
    for batch in (1, 7):
        out = tmp_path / f"b{batch}"
        args = ["--model", "llm_jax", "--model_args", f"run_dir={tiny_run},max_length=128",
                "--tasks", "tiny_mc_lm", "--include_path", str(tasks), "--batch_size",
                str(batch), "--log_samples", "--output_path", str(out)]
        # batch 1 through `python -m llm.eval.harness`, batch 7 through the plain lm_eval
        # command (llm_jax registered by the import hook tools/setup_env.sh installs)
        command = ([sys.executable, "-m", "llm.eval.harness", *args] if batch == 1
                   else [lm_eval_bin, *args])
        proc = subprocess.run(command, cwd=REPO, env=offline, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (samples,) = glob.glob(str(out / "*" / "samples_tiny_mc_lm_*.jsonl"))
        rows = sorted((json.loads(line) for line in read(samples).splitlines()),
                      key=lambda r: r["doc_id"])
        per_batch[batch] = [[float(r[0][0]) for r in row["resps"]] for row in rows]
        (results,) = glob.glob(str(out / "*" / "results_*.json"))
        per_batch[f"acc{batch}"] = json.loads(read(results))["results"]["tiny_mc_lm"]
    assert per_batch[1] == per_batch[7]  # bitwise per-sample log-likelihoods
    native = json.loads(read(os.path.join(evaluated[0], "tiny_mc.json")))
    assert per_batch[1] == [s["lls"] for s in native["samples"]]
    for metric in ("acc", "acc_norm"):
        assert per_batch["acc1"][f"{metric},none"] == native["metrics"][metric]["value"]
