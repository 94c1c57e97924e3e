"""Reward functions that fail, for the bad-input tests of experiments.rlhf."""


def raises(prompt: str, completion: str, reference: str) -> float:
    raise KeyError("no score for this one")


def nan(prompt: str, completion: str, reference: str) -> float:
    return float("nan")
