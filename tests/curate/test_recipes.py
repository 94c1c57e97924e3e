"""Every recipe in gin_configs/data parses, builds its steps, and (on tiny input) runs."""

import glob
import json
import pathlib

import gin
import pytest

from llm.data.curate import steps as registry
from llm.data.curate.run import curate
from tests.curate.corpus import web_corpus

# Curation recipes: the data configs that configure `curate` (chat_tokens.gin sets the tokenizer).
RECIPES = sorted(f for f in glob.glob("gin_configs/data/*.gin")
           if "curate." in pathlib.Path(f).read_text())


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_recipes_exist():
    assert {"gin_configs/data/web.gin", "gin_configs/data/stdlib.gin",
            "gin_configs/data/code.gin", "gin_configs/data/mixture.gin"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_on_tiny_input(recipe, tmp_path):
    gin.parse_config_files_and_bindings([recipe], [])
    names = gin.query_parameter("curate.steps")
    registry.build(names)
    src = web_corpus(str(tmp_path / "in"), n=12, files=2)
    ds = curate(out_dir=str(tmp_path / "out"), workers=1, quiet=True,
                sources=[{"kind": "jsonl", "path": src, "domain": "web"}])
    assert ds["accounting"]["ok"]
    saved = json.loads((tmp_path / "out" / "datasheet.json").read_text())
    assert saved["meta"]["steps"] == names


def test_balance_recipe_reports_mixture(tmp_path):
    gin.parse_config_files_and_bindings(["gin_configs/data/mixture.gin"], [])
    a = web_corpus(str(tmp_path / "a"), n=30, files=1, seed=1)
    b = web_corpus(str(tmp_path / "b"), n=10, files=1, seed=2)
    ds = curate(out_dir=str(tmp_path / "out"), workers=1, quiet=True,
                steps=["normalize", "balance"],
                sources=[{"kind": "jsonl", "path": a, "domain": "web"},
                         {"kind": "jsonl", "path": b, "domain": "books"}])
    bal = ds["global_steps"]["balance"]
    assert bal["rates"]["books"] > 1.0 > bal["rates"]["web"]
    a_ = ds["accounting"]
    assert a_["balance_copies_added"] > 0 and a_["kept_records"] == \
        a_["kept_unique"] + a_["balance_copies_added"]
    comp = ds["composition"]["domain"]
    share = comp["books"][1] / (comp["books"][1] + comp["web"][1])
    assert 0.28 < share < 0.45     # T=2: from 10/40 = 25 % of words towards ~37 %


def test_cli_runs_and_reports_errors(tmp_path, capsys):
    from tools.curate import main

    src = web_corpus(str(tmp_path / "in"), n=12, files=1)
    rc = main(["--gin_file=gin_configs/data/web.gin", f"--out_dir={tmp_path / 'out'}",
               "--workers=1", f"--gin_param=curate.sources=[{{'kind': 'jsonl', 'path': '{src}'}}]",
               "--gin_param=curate.quiet=True"])
    assert rc == 0
    assert "accounting OK" in capsys.readouterr().out
    assert (tmp_path / "out" / "datasheet.md").exists()
    gin.clear_config()
    rc = main(["--gin_file=gin_configs/data/web.gin", f"--out_dir={tmp_path / 'bad'}",
               "--gin_param=curate.sources=[{'kind': 'jsonl', 'path': '/nonexistent/*.jsonl'}]"])
    assert rc == 2
    assert "No files match '/nonexistent/*.jsonl'" in capsys.readouterr().err
