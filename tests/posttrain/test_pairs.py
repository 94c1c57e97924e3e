"""Preference JSONL: reading (errors name file:line), token rows, ranking samples into pairs."""

from __future__ import annotations

import json

import pytest

from llm.data.objectives import EOS_ID, PAD_ID
from llm.data.sources import DataError
from llm.posttrain import pairs


def write(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_pairs_keeps_extra_fields(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b",
                                        "reviewer": "ann"}), "",
                            json.dumps({"chosen": "full a", "rejected": "full b"})])
    got = pairs.read_pairs(path)
    assert got == [pairs.Pair("q", "a", "b", {"reviewer": "ann"}),
                   pairs.Pair("", "full a", "full b", {})]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q", "rejected": "b"}', r"p.jsonl:2 has no 'chosen' field"),
    ('{"prompt": "q", "chosen": "a"}', r"p.jsonl:2 has no 'rejected' field"),
    ('{"prompt": "q", "chosen": ["a"], "rejected": "b"}', r"p.jsonl:2: 'chosen' is a list"),
    ('[1, 2]', r"p.jsonl:2 is a JSON list"),
    ('{"prompt": ', r"p.jsonl:2 is not valid JSON"),
])
def test_read_pairs_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, ['{"prompt": "q", "chosen": "a", "rejected": "b"}', line])
    with pytest.raises(DataError, match=message) as e:
        pairs.read_pairs(path)
    assert "\n" not in str(e.value)


def test_read_pairs_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pairs.read_pairs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="holds no pairs"):
        pairs.read_pairs(write(tmp_path, [""]))


def test_layout_row_by_hand():
    tokens, mask, last, cut = pairs.layout_row([5, 6, 7], [8, 9], 8)
    assert tokens.tolist() == [PAD_ID, 5, 6, 7, 8, 9, EOS_ID, PAD_ID]
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 0] and last == 6 and not cut
    # too long: the prompt loses its first tokens, the response keeps its own
    tokens, mask, last, cut = pairs.layout_row([5, 6, 7], [8, 9, 10], 6)
    assert tokens.tolist() == [PAD_ID, 7, 8, 9, 10, EOS_ID]
    assert mask.tolist() == [0, 0, 1, 1, 1, 1] and last == 5 and cut
    tokens, mask, last, cut = pairs.layout_row([5], [8, 9, 10, 11, 12], 5)
    assert tokens.tolist() == [PAD_ID, 8, 9, 10, EOS_ID] and cut


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]


def test_encode_pairs_and_padding():
    rows, cut = pairs.encode_pairs(CharTokenizer(), [pairs.Pair("ab", "c", "de")], 8)
    assert cut == 0
    assert rows["chosen"][0].tolist() == [PAD_ID, 97, 98, 99, EOS_ID, 0, 0, 0]
    assert rows["rejected"][0].tolist() == [PAD_ID, 97, 98, 100, 101, EOS_ID, 0, 0]
    assert rows["chosen_last"][0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert rows["rejected_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    padded = pairs.pad_to_multiple(rows, 4)
    assert padded["chosen"].shape == (4, 8) and padded["chosen_last"][1:].sum() == 0


def test_rank_into_pairs():
    got = pairs.rank_into_pairs(["p1", "p2", "p3"],
                                [["a", "b", "c"], ["x", "y", "z"], ["u", "v", "w"]],
                                [[0.5, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.5, 0.5]],
                                ids=["i1", "i2", "i3"])
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [("p1", "b", "c"),
                                                               ("p3", "v", "u")]
    assert got[0].meta == {"chosen_reward": 1.0, "rejected_reward": 0.0, "id": "i1"}


def test_split_heldout_is_by_prompt():
    ps = [pairs.Pair(f"prompt {i // 2}", "a", "b") for i in range(400)]
    train, held = pairs.split_heldout(ps, 0.25)
    assert 20 < len(held) < 180 and len(train) + len(held) == 400
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert pairs.split_heldout(ps, 0.25) == (train, held)


def test_cut_completion_chat():
    assert pairs.cut_completion("42\n<|user|>\nmore", "chat") == "42"
    assert pairs.cut_completion("42\n<|user|>", "raw") == "42\n<|user|>"
    assert pairs.format_prompt("q", "chat") == "<|user|>\nq\n<|assistant|>\n"
