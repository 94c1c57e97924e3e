"""The frozen labelled sets: unchanged since freezing, scored correctly, and the filters' figures on
them (docs/curation.md) do not regress.

The sets (tests/curate/eval_sets/, provenance in its README) were written before the rules were
read; the figures before any rule change are in docs/eval/filters_frozen_before.json. The floors
below guard the figures quoted in docs/curation.md (rules were improved afterwards, on this set,
so they are in-sample for the improved rules; see the doc).
"""

import hashlib
import os
import pathlib

import pytest

from llm.data.curate import filter_eval, pii, toxicity


def test_sets_are_frozen():
    readme = pathlib.Path(filter_eval.EVAL_DIR, "README.md").read_text()
    for name, digest in filter_eval.FROZEN.items():
        with open(os.path.join(filter_eval.EVAL_DIR, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
        assert digest in readme
    assert len(filter_eval.load_toxicity()) == 375
    assert sum(len(r["pii"]) for r in filter_eval.load_pii()) == 148


def test_a_changed_set_is_refused(tmp_path):
    for name in filter_eval.FROZEN:
        src = pathlib.Path(filter_eval.EVAL_DIR, name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(src + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="changed since it was frozen"):
        filter_eval.load_pii(str(tmp_path))


def test_pii_scoring_by_hand():
    rows = [{"kind": "x", "text": "mail a@b.io or call 555 0101, ip 10.0.0.1",
             "pii": [["email", "a@b.io"], ["phone", "555 0101"], ["ip_address", "10.0.0.1"]]},
            {"kind": "y", "text": "version 1.2.3.4", "pii": []}]

    def detector(text):  # finds the e-mail, half the phone, the IP as PHONE, a version as IP
        if text.startswith("mail"):
            return [(5, 11, "EMAIL"), (20, 24, "PHONE"), (33, 41, "PHONE")]
        return [(8, 15, "IP_ADDRESS")]

    r = filter_eval.score_pii(detector, rows)
    # e-mail: found. phone: 4 of 8 characters covered < 80% -> missed; the IP span labelled
    # PHONE overlaps no phone label -> a phone FP; the IP is missed but fully covered (not leaked).
    assert (r["email"]["tp"], r["email"]["fn"], r["email"]["fp"]) == (1, 0, 0)
    assert (r["phone"]["tp"], r["phone"]["fn"], r["phone"]["fp"]) == (0, 1, 1)
    assert r["phone"]["leaked"] == 1 and r["ip_address"]["leaked"] == 0
    assert (r["ip_address"]["tp"], r["ip_address"]["fn"], r["ip_address"]["fp"]) == (0, 1, 1)
    assert r["email"]["precision"] == 1.0 and r["phone"]["precision"] == 0.0


def test_pii_figures_on_the_frozen_set():
    rows = filter_eval.load_pii()
    public = filter_eval.score_pii(pii.find, rows)
    every = filter_eval.score_pii(lambda t: pii.find(t, ip_scope="all"), rows)
    for typ, r in every.items():
        assert r["precision"] >= 0.97, (typ, r["false"])
        assert r["recall"] >= (0.9 if typ == "phone" else 0.95), (typ, r["missed"])
    # "public" keeps private/documentation/loopback addresses, which the set labels as PII.
    assert public["ip_address"]["recall"] < every["ip_address"]["recall"]
    assert public["ip_address"]["fp"] == 0
    # near-misses (versions, dates, hashes, UUIDs, ...) are never redacted
    for row in rows:
        if row["kind"].startswith("near_miss") and not row["pii"]:
            assert pii.find(row["text"], ip_scope="all") == [], row["text"]


def test_toxicity_figures_on_the_frozen_set():
    r = filter_eval.score_toxicity(lambda t: toxicity.wordlist_score(t)[1] >= 1,
                                   filter_eval.load_toxicity())
    assert r["precision"] >= 0.85 and r["recall"] >= 0.55, r
    flagged = {k: int(v.split("/")[0]) for k, v in r["flagged_per_category"].items()}
    assert flagged["plain"] == 0 and flagged["medical"] == 0 and flagged["code"] <= 1
    assert flagged["obfuscated"] >= 30
    # what a word list cannot see: threats and identity attacks written without swear words
    assert flagged["threat"] <= 2
