"""Reward functions for tests of experiments.rlhf: two that fail (the bad-input tests), and one
whose samples almost never tie (so a tiny model's samples always give preference pairs)."""


def raises(prompt: str, completion: str, reference: str) -> float:
    raise KeyError("no score for this one")


def nan(prompt: str, completion: str, reference: str) -> float:
    return float("nan")


def length(prompt: str, completion: str, reference: str) -> float:
    return float(len(completion))
