"""Human pairwise review: the SQLite store, Bradley-Terry strengths, the report and DPO pairs.

A review compares *systems* (a run directory at a checkpoint and sampling setting) on the same
prompts. `tools/review.py export` writes items, one JSON object per line:

    {"id": "p0003:base-vs-sft", "prompt": "...", "system_a": "base", "output_a": "...",
     "system_b": "sft", "output_b": "..."}

`tools/review.py serve` loads them into a SQLite database (table `items`) and records one row per
(item, reviewer) in `ratings`: which system was shown on the left (the order is randomized per
item and reviewer and recorded), the key pressed (`A` = left, `B` = right, `tie`, `skip`) and the
winning system. Every rating is committed as it is made, so a review can stop and resume.

Bradley-Terry (Bradley & Terry 1952): P(i beats j) = p_i / (p_i + p_j). The maximum-likelihood
strengths are found with Hunter's (2004) MM iteration p_i <- W_i / sum_j n_ij / (p_i + p_j), a tie
counting as half a win for each side; reported as theta_i = log p_i centred to mean 0, so
P(i beats j) = sigmoid(theta_i - theta_j). A small prior (`prior` virtual comparisons, split evenly,
between every pair of systems) keeps the MLE finite when a system wins every comparison.
Confidence intervals: percentile bootstrap over ratings.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence

import numpy as np

from llm.data.sources import DataError

CHOICES = ("A", "B", "tie", "skip")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, prompt TEXT NOT NULL,
    system_a TEXT NOT NULL, output_a TEXT NOT NULL,
    system_b TEXT NOT NULL, output_b TEXT NOT NULL,
    source TEXT NOT NULL, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
    item_id TEXT NOT NULL REFERENCES items(id), reviewer TEXT NOT NULL,
    left_system TEXT NOT NULL, right_system TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),
    winner TEXT, created REAL NOT NULL, seconds REAL,
    PRIMARY KEY (item_id, reviewer));
"""


def connect(db_path: str) -> sqlite3.Connection:
    """Open (creating if needed) a review database. WAL mode: readers never block the server."""
    os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


def read_items(path: str) -> list[dict]:
    """Items from an export JSONL; DataError naming file:line for a malformed or incomplete line."""
    if not os.path.isfile(path):
        raise DataError(f"samples file {path!r} does not exist; write it with "
                        "`python -m tools.review export`.")
    keys = ("id", "prompt", "system_a", "output_a", "system_b", "output_b")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}).") from None
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                raise DataError(f"{path}:{lineno} lacks {', '.join(missing)} (an item needs "
                                f"{', '.join(keys)}).")
            if item["system_a"] == item["system_b"]:
                raise DataError(f"{path}:{lineno} compares system {item['system_a']!r} with "
                                "itself; give the two systems different names.")
            items.append({k: str(item[k]) for k in keys})
    if not items:
        raise DataError(f"samples file {path!r} holds no items.")
    return items


def add_items(conn: sqlite3.Connection, items: Sequence[dict], source: str) -> int:
    """Insert items not yet in the database (by id); returns how many were new.

    An id already present with different content is an error (two exports reusing ids).
    """
    new = 0
    with conn:
        start = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        for item in items:
            row = conn.execute("SELECT prompt, system_a, output_a, system_b, output_b FROM items "
                               "WHERE id = ?", (item["id"],)).fetchone()
            fields = (item["prompt"], item["system_a"], item["output_a"], item["system_b"],
                      item["output_b"])
            if row is None:
                conn.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (item["id"], *fields, source, start + new))
                new += 1
            elif tuple(row) != fields:
                raise DataError(f"item {item['id']!r} from {source} differs from the item with "
                                "that id already in the database; export to a new database or "
                                "give the items new ids.")
    return new


def left_is_a(item_id: str, reviewer: str, seed: int = 0) -> bool:
    """Whether item's system_a is shown on the left to this reviewer: a fair coin per (item,
    reviewer, seed), stable across page reloads and server restarts."""
    import hashlib

    h = hashlib.sha256(f"{seed}\0{item_id}\0{reviewer}".encode()).digest()
    return h[0] & 1 == 0


def next_item(conn: sqlite3.Connection, reviewer: str) -> sqlite3.Row | None:
    """The first item (in export order) this reviewer has not rated, or None when done."""
    return conn.execute(
        "SELECT * FROM items WHERE id NOT IN (SELECT item_id FROM ratings WHERE reviewer = ?) "
        "ORDER BY position LIMIT 1", (reviewer,)).fetchone()


def progress(conn: sqlite3.Connection, reviewer: str) -> tuple[int, int]:
    """(items this reviewer has rated, items in the database)."""
    done = conn.execute("SELECT COUNT(*) FROM ratings WHERE reviewer = ?", (reviewer,)).fetchone()
    total = conn.execute("SELECT COUNT(*) FROM items").fetchone()
    return int(done[0]), int(total[0])


def record(conn: sqlite3.Connection, item_id: str, reviewer: str, left_system: str,
           choice: str, seconds: float | None = None) -> str | None:
    """Store one rating (replacing this reviewer's earlier rating of the item); returns the winner
    system (None for tie/skip). `left_system` is the system the reviewer saw on the left."""
    if choice not in CHOICES:
        raise ValueError(f"choice {choice!r} is not one of {CHOICES}.")
    if not reviewer.strip():
        raise ValueError("a rating needs a reviewer name.")
    item = conn.execute("SELECT system_a, system_b FROM items WHERE id = ?", (item_id,)).fetchone()
    if item is None:
        raise ValueError(f"unknown item {item_id!r}.")
    if left_system not in (item["system_a"], item["system_b"]):
        raise ValueError(f"{left_system!r} is not a system of item {item_id!r}.")
    right_system = item["system_b"] if left_system == item["system_a"] else item["system_a"]
    winner = {"A": left_system, "B": right_system}.get(choice)
    with conn:
        conn.execute("INSERT OR REPLACE INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (item_id, reviewer, left_system, right_system, choice, winner, time.time(),
                      seconds))
    return winner


def comparisons(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
    """Every decisive or tied rating as (system_i, system_j, score of i): 1 win, 0.5 tie."""
    out = []
    for r in conn.execute("SELECT left_system, right_system, choice FROM ratings "
                          "WHERE choice != 'skip' ORDER BY created"):
        score = {"A": 1.0, "B": 0.0, "tie": 0.5}[r["choice"]]
        out.append((r["left_system"], r["right_system"], score))
    return out


def _counts(systems: Sequence[str], comps: Iterable[tuple[str, str, float]]
            ) -> tuple[np.ndarray, np.ndarray]:
    """wins[i, j] = points of i against j (ties 0.5 each); games[i, j] = comparisons of i and j."""
    index = {s: k for k, s in enumerate(systems)}
    wins = np.zeros((len(systems),) * 2)
    for a, b, score in comps:
        i, j = index[a], index[b]
        wins[i, j] += score
        wins[j, i] += 1.0 - score
    return wins, wins + wins.T


def bradley_terry(wins: np.ndarray, prior: float = 0.0, iters: int = 10_000,
                  tol: float = 1e-12) -> np.ndarray:
    """MLE log-strengths theta [n] (mean 0) from wins[i, j] (points of i against j).

    prior: virtual comparisons between every pair, split evenly (0 = plain MLE, which is finite
    only when the comparison graph is strongly connected).
    """
    n = wins.shape[0]
    w = wins + prior / 2.0 * (1 - np.eye(n))
    games = w + w.T
    total = w.sum(axis=1)
    if n < 2 or np.any(total <= 0):
        raise ValueError("Bradley-Terry needs >= 2 systems and a win or tie for each (add a "
                         "prior or more ratings).")
    p = np.ones(n)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = total / denom
        new /= math.exp(np.log(new).mean())
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    theta = np.log(p)
    return theta - theta.mean()


def report(conn: sqlite3.Connection, *, bootstrap: int = 1000, prior: float = 0.1,
           seed: int = 0) -> dict:
    """Strengths with 95% percentile-bootstrap CIs, win-rate matrix and counts, as a dict."""
    comps = comparisons(conn)
    rows = conn.execute("SELECT reviewer, choice, COUNT(*) AS n FROM ratings "
                        "GROUP BY reviewer, choice").fetchall()
    systems = sorted({s for r in conn.execute("SELECT system_a, system_b FROM items") for s in r})
    if not comps:
        raise DataError("no ratings other than skips yet; rate some items with "
                        "`python -m tools.review serve` first.")
    wins, games = _counts(systems, comps)
    theta = bradley_terry(wins, prior=prior)
    rng = np.random.default_rng(seed)
    boot = np.empty((bootstrap, len(systems)))
    for b in range(bootstrap):
        sample = [comps[k] for k in rng.integers(0, len(comps), len(comps))]
        boot[b] = bradley_terry(_counts(systems, sample)[0], prior=prior)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(games > 0, wins / np.where(games > 0, games, 1), np.nan)
    by_reviewer: dict[str, dict[str, int]] = {}
    for r in rows:
        by_reviewer.setdefault(r["reviewer"], {c: 0 for c in CHOICES})[r["choice"]] = r["n"]
    order = np.argsort(-theta)
    return {
        "systems": [systems[i] for i in order],
        "strength": {systems[i]: float(theta[i]) for i in order},
        "ci95": {systems[i]: [float(lo[i]), float(hi[i])] for i in order},
        "win_rate": {systems[i]: {systems[j]: (None if math.isnan(rate[i, j]) else
                                               float(rate[i, j])) for j in order} for i in order},
        "games": {systems[i]: {systems[j]: int(games[i, j]) for j in order} for i in order},
        "num_comparisons": len(comps),
        "ratings_by_reviewer": by_reviewer,
        "method": {"model": "Bradley-Terry, MLE by MM (Hunter 2004), ties = half a win",
                   "strength": "log-strength theta, mean 0; P(i beats j) = "
                               "sigmoid(theta_i - theta_j)",
                   "prior": prior, "bootstrap": bootstrap, "ci": "95% percentile bootstrap "
                   "over ratings", "seed": seed},
    }


def markdown(rep: dict) -> str:
    """The report as a markdown section (strength table and win-rate matrix)."""
    systems = rep["systems"]
    lines = ["# Human review", "",
             f"{rep['num_comparisons']} comparisons (skips excluded) by "
             f"{len(rep['ratings_by_reviewer'])} reviewer(s). {rep['method']['model']}; "
             f"{rep['method']['strength']}; {rep['method']['ci']} "
             f"({rep['method']['bootstrap']} resamples), prior {rep['method']['prior']}.", "",
             "| system | strength | 95% CI |", "|---|---:|---|"]
    for s in systems:
        lo, hi = rep["ci95"][s]
        lines.append(f"| {s} | {rep['strength'][s]:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    lines += ["", "Win rate of the row system against the column system (ties = 1/2; games in "
              "parentheses):", "", "| | " + " | ".join(systems) + " |",
              "|---|" + "---:|" * len(systems)]
    for a in systems:
        cells = []
        for b in systems:
            r = rep["win_rate"][a][b]
            cells.append("-" if r is None else f"{r:.2f} ({rep['games'][a][b]})")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "| reviewer | " + " | ".join(CHOICES) + " |", "|---|" + "---:|" * len(CHOICES)]
    for name, counts in sorted(rep["ratings_by_reviewer"].items()):
        lines.append(f"| {name} | " + " | ".join(str(counts[c]) for c in CHOICES) + " |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: str) -> str:
    """Strengths with CIs (left) and the win-rate matrix (right) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = rep["systems"]
    n = len(systems)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 2.2 * n, 3 + 0.3 * n))
    theta = np.array([rep["strength"][s] for s in systems])
    ci = np.array([rep["ci95"][s] for s in systems])
    ax1.errorbar(theta, range(n), xerr=[theta - ci[:, 0], ci[:, 1] - theta], fmt="o", capsize=4)
    ax1.set_yticks(range(n), systems)
    ax1.invert_yaxis()
    ax1.axvline(0, color="grey", lw=0.5)
    ax1.set_xlabel("Bradley-Terry log-strength (95% CI)")
    m = np.array([[np.nan if rep["win_rate"][a][b] is None else rep["win_rate"][a][b]
                   for b in systems] for a in systems])
    im = ax2.imshow(m, vmin=0, vmax=1, cmap="RdBu")
    for (i, j), v in np.ndenumerate(m):
        if not np.isnan(v):
            ax2.text(j, i, f"{v:.2f}", ha="center", va="center")
    ax2.set_xticks(range(n), systems, rotation=30, ha="right")
    ax2.set_yticks(range(n), systems)
    ax2.set_title("win rate (row vs column)")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


AGGREGATES = ("none", "majority")


def preference_pairs(conn: sqlite3.Connection, aggregate: str = "none",
                     min_votes: int = 1) -> list[dict]:
    """Decisive ratings as chosen/rejected pairs (`llm.posttrain.pairs` format: the reward model
    and DPO read it); ties and skips are left out.

    aggregate "none": one pair per decisive rating (reviewers who disagree give opposite pairs,
    which Bradley-Terry and DPO treat as soft labels). "majority": one pair per item whose
    decisive votes (at least `min_votes`) favour one system strictly; items with a split vote
    are left out. Each pair records its votes.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r} is not one of {AGGREGATES}.")
    out, votes = [], {}
    for r in conn.execute(
            "SELECT r.*, i.prompt, i.system_a, i.output_a, i.system_b, i.output_b FROM ratings r "
            "JOIN items i ON i.id = r.item_id WHERE r.winner IS NOT NULL "
            "ORDER BY i.position, r.reviewer"):
        outputs = {r["system_a"]: r["output_a"], r["system_b"]: r["output_b"]}
        loser = r["right_system"] if r["winner"] == r["left_system"] else r["left_system"]
        pair = {"prompt": r["prompt"], "chosen": outputs[r["winner"]],
                "rejected": outputs[loser], "chosen_system": r["winner"],
                "rejected_system": loser, "item_id": r["item_id"], "reviewer": r["reviewer"]}
        if aggregate == "none":
            out.append(pair)
        else:
            votes.setdefault(r["item_id"], []).append(pair)
    for item_pairs in votes.values():  # in item order (dicts keep insertion order)
        count = {}
        for p in item_pairs:
            count[p["chosen_system"]] = count.get(p["chosen_system"], 0) + 1
        ranked = sorted(count.items(), key=lambda kv: -kv[1])
        if len(item_pairs) < min_votes or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
            continue
        best = next(p for p in item_pairs if p["chosen_system"] == ranked[0][0])
        out.append({**{k: v for k, v in best.items() if k != "reviewer"},
                    "votes": {s: count.get(s, 0) for s in (best["chosen_system"],
                                                            best["rejected_system"])},
                    "reviewers": sorted(p["reviewer"] for p in item_pairs)})
    return out


def pair_names(systems: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of systems, in the order given."""
    return list(itertools.combinations(systems, 2))


@contextlib.contextmanager
def opened(db_path: str):
    """`with opened(path) as conn:` for a database that must already exist."""
    if not os.path.isfile(db_path):
        raise DataError(f"review database {db_path!r} does not exist; create it with "
                        "`python -m tools.review serve --db ... --samples ...`.")
    conn = connect(db_path)
    try:
        yield conn
    finally:
        conn.close()
