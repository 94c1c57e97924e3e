"""The task families and their rewards, on hand-made examples."""

from __future__ import annotations

import math
import os

import pytest

from llm.config import ConfigError
from llm.posttrain import tasks

EMAIL = os.path.join(os.path.dirname(os.__file__), "email", "*.py")

PROMPT = 'def double(x):\n    """Twice x."""\n'


@pytest.mark.parametrize("completion, parses, short", [
    ("    return 2 * x\n", 1.0, 1.0),
    ("    return 2 * x\n\ndef other():\n    pass\n", 1.0, 1.0),   # next def is cut off
    ("    y = 2 * x\n    return y\nprint(double(3))\n", 1.0, 1.0),
    ("    return 2 * (x\n", 0.0, 0.0),                           # unbalanced parenthesis
    ("", 0.0, 0.0),                                               # no body
    ("return 2 * x\n", 0.0, 0.0),                                 # not indented: no body
    ("    return x +\n", 0.0, 0.0),
    ("".join(f"    x{i} = {i}\n" for i in range(13)), 1.0, 0.5),  # 13 lines > 12
    ("    return " + "x + " * 30 + "x\n", 1.0, 0.5),             # a 135-character line
])
def test_code_rewards(completion, parses, short):
    assert tasks.code_parses(PROMPT, completion, "") == parses
    assert tasks.code_parses_short(PROMPT, completion, "") == short


def test_function_body_stops_at_dedent():
    assert tasks.function_body(PROMPT, "    a = 1\n\n    return a\n\nclass B:\n") == \
        "    a = 1\n\n    return a\n"


@pytest.mark.parametrize("completion, reference, exact, partial", [
    ("5218\n>>> 1 + 1\n", "5218", 1.0, 1.0),
    (" 5218 \n", "5218", 1.0, 1.0),
    ("5219\n", "5218", 0.0, 0.5 * 3 / 4),
    ("218\n", "5218", 0.0, 0.5 * 3 / 4),     # right-aligned: 8, 1, 2 match, 5 missing
    ("52180\n", "5218", 0.0, 0.0),           # right-aligned: 0/8, 8/1, 1/2, 2/5: none match
    ("[1, 2, 9, 5]\n", "[1, 2, 5, 9]", 0.0, 0.5 * 2 / 4),
    ("[1, 2]\n", "[1, 2, 5, 9]", 0.0, 0.5 * 2 / 4),
    ("'olleh'\n", "'olleh'", 1.0, 1.0),
    ("'ollex'\n", "'olleh'", 0.0, 0.5 * 6 / 7),
    ("\n", "12", 0.0, 0.0),
])
def test_exact_rewards(completion, reference, exact, partial):
    assert tasks.exact_match(">>> q\n", completion, reference) == exact
    assert tasks.exact_partial(">>> q\n", completion, reference) == pytest.approx(partial)


@pytest.mark.parametrize("task", ["addition", "sort", "reverse"])
def test_exact_tasks_are_correct_seeded_and_disjoint(task):
    train = tasks.make_examples(task, "train", 200, seed=0)
    heldout = tasks.make_examples(task, "heldout", 50, seed=0)
    assert len(train) == 200 and len(heldout) == 50
    assert tasks.make_examples(task, "train", 200, seed=0) == train
    assert tasks.make_examples(task, "train", 200, seed=1) != train
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    for ex in train[:50] + heldout[:10]:
        question = ex.prompt.removeprefix(">>> ").rstrip("\n")
        assert repr(eval(question)) == ex.reference  # the answer Python itself gives
        assert ex.response == ex.reference + "\n"
        assert tasks.exact_partial(ex.prompt, ex.response, ex.reference) == 1.0


def test_code_task_from_real_source():
    train = tasks.code_task("train", pattern=EMAIL)
    heldout = tasks.code_task("heldout", pattern=EMAIL)
    assert len(train) > 50 and len(heldout) >= 1
    assert not {e.id for e in train} & {e.id for e in heldout}
    assert tasks.code_task("train", 10, seed=3, pattern=EMAIL) == \
        tasks.code_task("train", 10, seed=3, pattern=EMAIL)
    by_id = {e.id: e for e in train + heldout}
    # email/utils.py (CPython 3.11), copied by hand from the source:
    ex = by_id["email/utils.py:_has_surrogates"]
    assert ex.prompt == ('def _has_surrogates(s):\n'
                         '    """Return True if s contains surrogate-escaped binary data."""\n')
    assert ex.response.endswith("    try:\n        s.encode()\n        return False\n"
                                "    except UnicodeEncodeError:\n        return True\n")
    assert ex.response.startswith("    # This check is based on the fact")
    for ex in train + heldout:
        assert ex.prompt.startswith("def ")
        assert tasks.code_parses(ex.prompt, ex.response, ex.reference) == 1.0
        assert tasks.code_parses(ex.prompt, "", ex.reference) == 0.0


class Boom(Exception):
    pass


def raises(prompt, completion, reference):
    raise Boom("bad reward\nsecond line")


def nan(prompt, completion, reference):
    return float("nan")


def test_call_reward_names_function_and_sample():
    with pytest.raises(tasks.RewardError) as e:
        tasks.call_reward(raises, "def f():\n", "    return 1\n", "")
    msg = str(e.value)
    assert "\n" not in msg and "Boom: bad reward" in msg and "test_tasks:raises" in msg
    assert "'def f():\\n'" in msg and "'    return 1\\n'" in msg
    with pytest.raises(tasks.RewardError, match="returned nan on the sample prompt='p'"):
        tasks.call_reward(nan, "p", "c", "r")
    with pytest.raises(tasks.RewardError, match="not a number"):
        tasks.call_reward(lambda p, c, r: "high", "p", "c", "r")
    fn = tasks.get_reward("tests.posttrain.test_tasks:nan")
    assert math.isnan(fn("", "", ""))
    with pytest.raises(ConfigError, match="'exact_partial'"):
        tasks.get_reward("exact_parital")
    assert list(tasks.score("exact_match", ["a", "b"], ["1", "2"], ["1", "3"])) == [1.0, 0.0]
