"""Toxicity step behaviour at the document level (default `min_hits=2`), and pluggable scorers.

This small set is a regression check of the step's defaults on whole messages, written together
with the first version of the rules: it is NOT a quality figure. Precision and recall are
measured on the frozen, independently written set (tests/curate/eval_sets/, graded in
tests/curate/test_eval_sets.py and reported in docs/curation.md).
"""

import dataclasses

from llm.data.curate import toxicity
from llm.data.sources import Document

TOXIC = [
    "You are a fucking idiot and everyone here thinks you are a worthless piece of shit.",
    "Shut up, you stupid bitch. Nobody cares about your bullshit opinions.",
    "What an asshole. Go fuck yourself and take your crap with you.",
    "This motherfucker keeps posting garbage, what a dumbass loser.",
    "F*ck off you b1tch, you are such a wh0re.",
    "Listen here you piece of shit, I will beat your ass if you post again, bastard.",
    "Only a retard would write this shit. You dickhead.",
    "Damn you and your bullshit, you son of a bitch.",
    "Eat shit and die, you pathetic cunt.",
    "He is a total jackass and a lying sack of shit.",
    "Your mom is a slut and your dad is a prick.",
    "What the fuck is wrong with you, moron? Fucking clown.",
    "I hope you choke, you worthless douchebag asshole.",
    "Go to hell you dumb fuck, nobody wants you here.",
    "This is the dumbest shit I have ever read, you twat.",
    "Stupid bastards like you ruin everything, piss off.",
    "Suck my dick, loser. You are a joke and a wanker.",
    "The author is a fucking fraud and a shithead.",
    "Get lost, you filthy skank. You are disgusting.",
    "Shut your mouth, douche. You absolute tosser.",
]
CLEAN = [
    "Scunthorpe United won the match; fans in Middlesex and Essex celebrated.",
    "The assessment of the class assistant was passed to the embassy.",
    "We ordered a cocktail and a Dickens novel for the book club.",
    "Breast cancer screening and sex education are part of public health.",
    "Use kill -9 to kill the stuck process, then restart the daemon.",
    "Hello world! The shell script analyses the assembly output.",
    "The cockpit crew checked the peacock feathers in the museum.",
    "Hancock Park is near the bass guitar shop on Shitterton Road.",
    "The therapist discussed the analysis with the grape farmer.",
    "God is mentioned in many ancient texts about naked-eye astronomy.",
    "The hellfire missile and the Hellenic navy were discussed in parliament.",
    "Press the butt end of the rifle against the shoulder, the instructor said.",
    "A weed is a plant in the wrong place; the gardener pulled it out.",
    "The Matsushita merger was approved; the pass rate improved.",
    "Dick Van Dyke starred in the film; the dickcissel is a small bird.",
    "The documentation describes how to strip whitespace and compute len(x).",
    "Ugly ducklings grow into swans, the story says.",
    "The butcher sold pork, the bass player tuned up, and the classes ended.",
    "We discussed drug interactions with the pharmacist before surgery.",
    "Sussex and Wessex are historic regions of England.",
]


def _measure(**kw):
    tp = fp = fn = 0
    for texts, label in ((TOXIC, 1), (CLEAN, 0)):
        for t in texts:
            pred = toxicity.toxicity(Document("d", t, "s"), **kw) == "toxic"
            tp += pred and label
            fp += pred and not label
            fn += (not pred) and label
    return tp / max(tp + fp, 1), tp / (tp + fn)


def test_document_level_defaults_regression():
    precision, recall = _measure()
    # at the time of writing: 18/19 flagged are toxic ("Dick Van Dyke" is the false positive),
    # 18/20 toxic messages flagged (two-token minimum: single-swear messages pass)
    assert precision >= 0.9 and recall >= 0.85


def test_pluggable_scorer_and_tag_only(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("my_scorer")
    mod.score = lambda text: 0.9 if "bad" in text else 0.1
    monkeypatch.setitem(sys.modules, "my_scorer", mod)
    step = toxicity.toxicity_step(scorer="my_scorer:score", threshold=0.5)
    assert step(Document("d", "bad words", "s")) == "toxic"
    assert isinstance(step(Document("d", "good words", "s")), Document)
    tagged = toxicity.toxicity(Document("d", "what the fuck, shit", "s"), tag_only=True)
    assert dataclasses.is_dataclass(tagged) and tagged.metadata["toxicity"] > 0
