"""Bradley-Terry fit, report arithmetic and the rating store, against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llm.data.sources import DataError
from llm.eval import review


def test_two_systems_closed_form():
    # x beats y 3 times, y beats x once: the MLE has p_x / p_y = 3 / 1.
    wins = np.array([[0.0, 3.0], [1.0, 0.0]])
    theta = review.bradley_terry(wins)
    assert theta[0] - theta[1] == pytest.approx(math.log(3), abs=1e-9)
    assert theta.sum() == pytest.approx(0.0, abs=1e-12)
    # Two ties count as one win each: 2 + 1 points vs 1 + 1 -> ratio 3/2.
    wins = np.array([[0.0, 3.0], [2.0, 0.0]])
    assert np.diff(review.bradley_terry(wins))[0] == pytest.approx(-math.log(1.5), abs=1e-9)
    # The prior adds prior/2 points each way: (3 + 1) / (1 + 1) with prior 2.
    wins = np.array([[0.0, 3.0], [1.0, 0.0]])
    assert np.diff(review.bradley_terry(wins, prior=2.0))[0] == pytest.approx(-math.log(2.0))


def test_three_systems():
    # A cycle with equal margins (a>b 2-1, b>c 2-1, c>a 2-1): all strengths equal.
    wins = np.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]], float)
    assert np.allclose(review.bradley_terry(wins), 0.0, atol=1e-9)
    # An uneven example: the MLE satisfies the likelihood equations
    # sum_j n_ij p_i / (p_i + p_j) = W_i for every i (checked here by hand from the definition).
    wins = np.array([[0, 4, 3], [2, 0, 5], [1, 1, 0]], float)
    p = np.exp(review.bradley_terry(wins))
    n = wins + wins.T
    for i in range(3):
        expected = sum(n[i, j] * p[i] / (p[i] + p[j]) for j in range(3) if j != i)
        assert expected == pytest.approx(wins[i].sum(), rel=1e-8)
    # ... and it is the maximum: the log-likelihood drops in every direction.
    def loglik(t):
        return sum(wins[i, j] * (t[i] - np.logaddexp(t[i], t[j]))
                   for i in range(3) for j in range(3) if i != j)
    t = np.log(p)
    for d in np.eye(3):
        assert loglik(t) > loglik(t + 0.01 * d) and loglik(t) > loglik(t - 0.01 * d)
    with pytest.raises(ValueError):
        review.bradley_terry(np.array([[0.0, 2.0], [0.0, 0.0]]))  # y never scores: MLE infinite


def _db(tmp_path, items):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    conn = review.connect(str(tmp_path / "r.sqlite"))
    review.add_items(conn, review.read_items(str(path)), str(path))
    return conn


def _item(k, a, b):
    return {"id": f"i{k}", "prompt": f"p{k}", "system_a": a, "output_a": f"{a}{k}",
            "system_b": b, "output_b": f"{b}{k}"}


def test_report_win_rates_and_pairs(tmp_path):
    items = [_item(k, "x", "y") for k in range(5)] + [_item(5, "y", "z"), _item(6, "x", "z")]
    conn = _db(tmp_path, items)
    # (item, left system shown, key): x beats y 3 times, y beats x once, one tie, one skip.
    for k, left, choice in [(0, "x", "A"), (1, "y", "B"), (2, "y", "B"), (3, "x", "B"),
                            (4, "y", "tie"), (5, "z", "B"), (6, "x", "skip")]:
        review.record(conn, f"i{k}", "ann", left, choice)
    rows = conn.execute("SELECT item_id, winner FROM ratings ORDER BY item_id").fetchall()
    assert [tuple(r) for r in rows] == [("i0", "x"), ("i1", "x"), ("i2", "x"), ("i3", "y"),
                                        ("i4", None), ("i5", "y"), ("i6", None)]
    rep = review.report(conn, bootstrap=200, prior=0.1, seed=0)
    # x vs y: 3 wins + 0.5 tie of 5 games = 0.7; y vs z: 1 of 1; x vs z: skipped -> no games.
    assert rep["win_rate"]["x"]["y"] == pytest.approx(0.7)
    assert rep["win_rate"]["y"]["x"] == pytest.approx(0.3)
    assert rep["win_rate"]["y"]["z"] == 1.0 and rep["win_rate"]["x"]["z"] is None
    assert rep["games"]["x"]["y"] == 5 and rep["num_comparisons"] == 6
    assert rep["systems"] == ["x", "y", "z"]
    for s in rep["systems"]:
        lo, hi = rep["ci95"][s]
        assert lo <= rep["strength"][s] <= hi
    assert rep == review.report(conn, bootstrap=200, prior=0.1, seed=0)  # seeded
    assert rep["ratings_by_reviewer"]["ann"] == {"A": 1, "B": 4, "tie": 1, "skip": 1}
    pairs = review.preference_pairs(conn)
    assert len(pairs) == 5  # ties and skips left out
    assert pairs[0] == {"prompt": "p0", "chosen": "x0", "rejected": "y0", "chosen_system": "x",
                        "rejected_system": "y", "item_id": "i0", "reviewer": "ann"}
    assert pairs[3]["chosen"] == "y3" and pairs[3]["rejected"] == "x3"
    md = review.markdown(rep)
    assert "| x | " in md and "0.70 (5)" in md


def test_store_errors_and_order(tmp_path):
    conn = _db(tmp_path, [_item(0, "x", "y")])
    with pytest.raises(ValueError, match="choice"):
        review.record(conn, "i0", "ann", "x", "C")
    with pytest.raises(ValueError, match="unknown item"):
        review.record(conn, "nope", "ann", "x", "A")
    with pytest.raises(ValueError, match="not a system"):
        review.record(conn, "i0", "ann", "q", "A")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_item(0, "x", "y")) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        review.read_items(str(bad))
    # Re-adding the same items is a no-op (resume); a clashing id is an error.
    path = tmp_path / "s.jsonl"
    assert review.add_items(conn, review.read_items(str(path)), "again") == 0
    clash = dict(_item(0, "x", "y"), output_a="changed")
    with pytest.raises(DataError, match="differs"):
        review.add_items(conn, [clash], "clash")
    # The left/right order is a fair coin per (item, reviewer), stable for the same pair.
    flips = [review.left_is_a(f"i{k}", "ann") for k in range(400)]
    assert 160 < sum(flips) < 240
    assert flips == [review.left_is_a(f"i{k}", "ann") for k in range(400)]
