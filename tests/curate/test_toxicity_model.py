"""The optional in-repo toxicity classifier: trained on its own set, graded on the frozen one."""

from llm.data.curate import filter_eval, toxicity, toxicity_model
from llm.data.sources import Document


def test_training_and_evaluation_sets_are_disjoint():
    train, labels = toxicity_model.load_training_set()
    frozen = {r["text"] for r in filter_eval.load_toxicity()}
    assert len(train) == 258 and 0 < labels.sum() < len(labels)
    assert not frozen & set(train)


def test_classifier_on_the_frozen_set():
    r = filter_eval.score_toxicity(lambda t: toxicity_model.score(t) >= 0.5,
                                   filter_eval.load_toxicity())
    # measured: precision 0.936, recall 0.903 (TP 131, FP 9, FN 14) -- docs/curation.md
    assert r["precision"] >= 0.9 and r["recall"] >= 0.85, r
    flagged = {k: int(v.split("/")[0]) for k, v in r["flagged_per_category"].items()}
    assert flagged["threat"] >= 15 and flagged["medical"] == 0      # what the word list cannot


def test_plugs_into_the_toxicity_step():
    step = toxicity.toxicity_step(scorer="llm.data.curate.toxicity_model:score", threshold=0.5)
    assert step(Document("a", "I will find you and break your legs.", "s")) == "toxic"
    ok = Document("b", "Kill the process with kill -9 and strip the string.", "s")
    assert step(ok) is ok
