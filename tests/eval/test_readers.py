"""Readers on hand-made rows in each published format (tests/eval/fixtures, written for this
repo: no copies of the public data). Expected fields are worked out from each dataset's format
and lm-eval's prompt for it."""

from __future__ import annotations

import os

import pytest

from llm.config import ConfigError
from llm.data.sources import DataError
from llm.eval import readers, suite
from llm.eval.tasks import TaskSpec, load_spec, make_example, read_jsonl

F = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_hellaswag():
    d = readers.read_hellaswag(f"{F}/hellaswag.jsonl")[0]
    assert d["context"] == "Making tea: A man fills a kettle with water. He"
    # " [title]" -> ". ", then the doubled space collapses.
    assert d["choices"][0] == "throws the kettle. out."
    assert d["gold"] == 2 and len(d["choices"]) == 4


def test_piqa_boolq_arc():
    p = readers.read_piqa(f"{F}/piqa.jsonl")
    assert [d["gold"] for d in p] == [0, 1]
    assert p[0]["context"] == "Question: To open a jar with a tight lid\nAnswer:"
    b = readers.read_boolq(f"{F}/boolq.jsonl")
    assert [d["gold"] for d in b] == [1, 0] and b[0]["choices"] == ["no", "yes"]
    assert b[0]["context"].endswith("\nQuestion: is the sun a star?\nAnswer:")
    a = readers.read_arc(f"{F}/arc.jsonl")
    assert [d["gold"] for d in a] == [1, 0]  # answerKey "B" of A-D; "1" of 1-3
    assert a[1]["choices"] == ["sunlight", "sand", "plastic"]


def test_winogrande_partial_scoring():
    d = readers.read_winogrande(f"{F}/winogrande.jsonl")[0]
    assert d["contexts"] == ["The trophy did not fit in the suitcase because the trophy",
                             "The trophy did not fit in the suitcase because the suitcase"]
    assert d["continuation"] == "was too big." and d["gold"] == 0
    spec = TaskSpec(name="w", data="", format="winogrande",
                    **readers.READERS["winogrande"].defaults)
    ex = make_example(spec, d)
    assert ex.choices == ["was too big.", "was too big."] and ex.gold == 0


def test_mmlu_lambada():
    docs = readers.read_mmlu(f"{F}/mmlu")
    assert [d["gold"] for d in docs] == [1, 2] and docs[0]["subject"] == "astronomy"
    assert docs[0]["context"] == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\n"
        "Answer:")
    lam = readers.read_lambada(f"{F}/lambada.txt")
    assert lam[0]["continuation"] == " roses"
    assert lam[1]["context"].endswith("there were still only")


def test_bias_formats():
    c = readers.read_crows_pairs(f"{F}/crows_pairs.csv")
    assert len(c) == 3 and c[1]["bias_type"] == "age"
    assert c[0]["sent_less"] == "The rich family could not afford the repair."
    b = readers.read_bbq(f"{F}/bbq.jsonl")
    assert [d["context_condition"] for d in b] == ["ambig", "disambig", "disambig"]
    s = readers.read_stereoset(f"{F}/stereoset.json")
    assert [d["split"] for d in s] == ["intrasentence", "intrasentence", "intersentence"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,,}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_jsonl(str(path))


def test_wrong_file_for_reader(tmp_path):
    with pytest.raises(DataError, match=r"missing field\(s\) .*activity_label"):
        readers.read_hellaswag(f"{F}/boolq.jsonl")


def test_empty_choices_and_unknown_task(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"q": "x", "choices": [], "gold": 0}\n')
    spec = TaskSpec(name="t", output_type="multiple_choice", data=str(path), doc_to_text="{q}")
    with pytest.raises(DataError, match="line 1: empty choices"):
        make_example(spec, read_jsonl(str(path))[0])
    with pytest.raises(ConfigError, match="unknown task 'helaswag'.*probes, counterfactual"):
        suite.resolve("helaswag")
    yaml_path = tmp_path / "t.yaml"
    yaml_path.write_text("output_type: multiple_choice\ndata: t.jsonl\nshots: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*shots"):
        load_spec(str(yaml_path))
