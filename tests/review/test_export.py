"""`tools.review export` on a real run: one checkpoint at two sampling settings, same prompts."""

from __future__ import annotations

import json

from tests.conftest import run_experiment


def test_export_two_settings(tiny_run, tmp_path):
    from llm.runs import load_run
    from llm.serve.sampler import generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def parse(msg):\\n    \nimport email\n\nclass Header:\n")
    out = tmp_path / "samples.jsonl"
    run_experiment("tools.review", [
        "export", "--prompts", str(prompts), "--out", str(out), "--max_new_tokens", "8",
        "--system", f"greedy={tiny_run}@temperature=0",
        "--system", f"hot={tiny_run}@temperature=1.5,top_k=0,seed=3"])
    items = [json.loads(x) for x in out.read_text().splitlines()]
    assert [i["id"] for i in items] == ["p0000:greedy-vs-hot", "p0001:greedy-vs-hot",
                                        "p0002:greedy-vs-hot"]
    assert items[0]["prompt"] == "def parse(msg):\n    "
    assert all(i["system_a"] == "greedy" and i["system_b"] == "hot" for i in items)
    # The greedy system's text is the sampler's greedy continuation of the same prompt.
    run = load_run(tiny_run)
    ids = [run.tokenizer.encode(i["prompt"]) for i in items]
    greedy = generate(run.graphdef, run.params, run.cfg, ids, max_new_tokens=8, temperature=0.0)
    assert [i["output_a"] for i in items] == [run.tokenizer.decode(t) for t in greedy]
    assert [i["output_a"] for i in items] != [i["output_b"] for i in items]
    meta = json.loads((tmp_path / "samples.jsonl.meta.json").read_text())
    assert meta["systems"][1]["temperature"] == 1.5 and meta["systems"][1]["resolved_step"] == 12


def test_bad_input_one_line(tiny_run, tmp_path, capsys):
    from tools import review as cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("x" * 5000 + "\n")
    export = ["export", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    # Through the real CLI once; the other cases call its main() in-process (same code path).
    proc = run_experiment("tools.review", [*export, "--system", f"a={tiny_run}", "--system",
                                           f"b={tiny_run}@temperature=0"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "exceeds the context" in proc.stderr
    cases = [
        ([*export, "--system", f"a={tiny_run}@temp=1", "--system", f"b={tiny_run}"],
         "unknown option"),
        ([*export, "--system", f"a={tiny_run}"], ">= 2 --system"),
        ([*export, "--system", f"a={tmp_path}", "--system", f"b={tiny_run}"],
         "not a run directory"),
        (["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r")],
         "does not exist"),
        (["serve", "--db", str(tmp_path / "db.sqlite"), "--samples", str(prompts)],
         "p.txt:1 is not valid JSON"),
        (["serve", "--db", str(tmp_path / "db.sqlite"), "--host", "0.0.0.0"], "loopback only"),
    ]
    for args, message in cases:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.jsonl").exists()
