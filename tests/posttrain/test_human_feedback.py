"""Human-review ratings (llm/eval/review.py, tools/review.py) as chosen/rejected pairs that the
reward model and DPO read (`llm.posttrain.pairs.read_pairs`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm.eval import review
from llm.posttrain import pairs
from tests.conftest import REPO


def rated_db(path: str, items: list[tuple[str, str, str]],
             votes: dict[int, list[tuple[str, str]]]) -> str:
    """A review database: items (prompt, output of system "base", output of "sft"); votes[k] =
    [(reviewer, winner system or "tie")]."""
    conn = review.connect(path)
    review.add_items(conn, [{"id": f"i{k}", "prompt": p, "system_a": "base", "output_a": a,
                             "system_b": "sft", "output_b": b}
                            for k, (p, a, b) in enumerate(items)], "test")
    for k, ballots in votes.items():
        for reviewer, winner in ballots:
            # the reviewer saw `base` on the left and pressed A (left) / B (right) / tie
            choice = {"base": "A", "sft": "B", "tie": "tie"}[winner]
            review.record(conn, f"i{k}", reviewer, "base", choice)
    conn.close()
    return path


ITEMS = [("p0", "a0", "b0"), ("p1", "a1", "b1"), ("p2", "a2", "b2"), ("p3", "a3", "b3")]
VOTES = {0: [("ann", "sft"), ("bob", "sft"), ("cat", "base")],   # 2:1 for sft
         1: [("ann", "base"), ("bob", "sft")],                   # split: no majority pair
         2: [("ann", "tie"), ("bob", "base")],                   # 1 decisive vote for base
         3: [("ann", "sft")]}


def test_pairs_per_rating_and_by_majority(tmp_path):
    conn = review.connect(rated_db(str(tmp_path / "r.sqlite"), ITEMS, VOTES))
    every = review.preference_pairs(conn)
    # 3 + 2 + 1 + 1 decisive ratings (the tie is left out), in item then reviewer order
    assert [(p["item_id"], p["reviewer"], p["chosen"]) for p in every] == [
        ("i0", "ann", "b0"), ("i0", "bob", "b0"), ("i0", "cat", "a0"), ("i1", "ann", "a1"),
        ("i1", "bob", "b1"), ("i2", "bob", "a2"), ("i3", "ann", "b3")]
    major = review.preference_pairs(conn, "majority")
    assert [(p["item_id"], p["chosen"], p["rejected"], p["votes"]) for p in major] == [
        ("i0", "b0", "a0", {"sft": 2, "base": 1}), ("i2", "a2", "b2", {"base": 1, "sft": 0}),
        ("i3", "b3", "a3", {"sft": 1, "base": 0})]
    assert major[0]["reviewers"] == ["ann", "bob", "cat"]
    two = review.preference_pairs(conn, "majority", min_votes=2)
    assert [p["item_id"] for p in two] == ["i0"]
    with pytest.raises(ValueError, match="aggregate"):
        review.preference_pairs(conn, "mean")


def test_review_cli_pairs_are_preference_data(tmp_path):
    db = rated_db(str(tmp_path / "r.sqlite"), ITEMS, VOTES)
    out = str(tmp_path / "pairs.jsonl")
    proc = subprocess.run([sys.executable, "-m", "tools.review", "pairs", "--db", db, "--out", out,
                           "--aggregate", "majority"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    got = pairs.read_pairs(out)  # the reward model's and DPO's reader
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [("p0", "b0", "a0"),
                                                              ("p2", "a2", "b2"),
                                                              ("p3", "b3", "a3")]
    assert got[0].meta["votes"] == {"sft": 2, "base": 1}
    with open(out) as f:
        assert all({"prompt", "chosen", "rejected"} <= set(json.loads(x)) for x in f)
    bad = subprocess.run([sys.executable, "-m", "tools.review", "pairs", "--db", db, "--out",
                          out, "--aggregate", "majority", "--min_votes", "0"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--min_votes 0 must be >= 1" in bad.stderr
