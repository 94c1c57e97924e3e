"""Iterative (on-policy) DPO's pair rounds, the RPO term of the DPO loss, and the Wilson interval
of the reported accuracies -- against hand counts and hand formulas, on a tiny random decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.config import ConfigError
from llm.posttrain import dpo, pairs
from tests.posttrain.test_preference_losses import CFG, GRAPHDEF, PARAMS, logp_by_hand, tiny_batch

ALPHABET = "0123456789 +>\n[],'abc"  # ids 2.. (0 = PAD/BOS, 1 = EOS); others map to the last


class CharTokenizer:
    """One id per character of ALPHABET: enough for the exact-answer prompts."""

    def encode(self, text: str) -> list[int]:
        return [2 + ALPHABET.index(c) if c in ALPHABET else 2 + len(ALPHABET) for c in text]

    def decode(self, ids) -> str:
        return "".join(ALPHABET[i - 2] if 2 <= i < 2 + len(ALPHABET) else "?" for i in ids)


def digit_count(prompt: str, completion: str, reference: str) -> float:
    """A reward written for this test: the number of digits in the completion."""
    del prompt, reference
    return float(sum(c.isdigit() for c in completion))


def test_round_pairs_are_fresh_on_policy_and_ranked(tmp_path):
    source = pairs.TaskPairs(task="addition", reward=f"{__name__}:digit_count",
                             train_prompts=8, samples=4, max_new_tokens=6, temperature=1.0,
                             batch_size=32, max_prompt_len=16, prompt_format="raw")
    round0 = {e.id for e in source.examples("train", 0)}
    round1 = source.examples("train", 1)
    assert len(round1) == 8 and not round0 & {e.id for e in round1}  # fresh prompts
    stats = source.build_round(GRAPHDEF, PARAMS, CFG, CharTokenizer(), str(tmp_path), 1)
    got = pairs.read_pairs(str(tmp_path / "train.jsonl"))
    assert stats["round"] == 1 and stats["train"]["pairs"] == len(got) > 0
    by_prompt = {e.prompt: e for e in round1}
    for p in got:
        assert p.prompt in by_prompt  # raw format: the task prompt itself
        # the rewards recorded and the ranking, recounted by hand from the texts
        assert p.meta["chosen_reward"] == sum(c.isdigit() for c in p.chosen)
        assert p.meta["rejected_reward"] == sum(c.isdigit() for c in p.rejected)
        assert p.meta["chosen_reward"] > p.meta["rejected_reward"]
    # the gap statistic is the mean of chosen - rejected over the pairs
    assert stats["train"]["mean_reward_gap"] == pytest.approx(
        np.mean([p.meta["chosen_reward"] - p.meta["rejected_reward"] for p in got]))
    # a resumed run reuses the round's pairs instead of sampling again (params None would fail)
    assert source.build_round(GRAPHDEF, None, CFG, CharTokenizer(), str(tmp_path), 1) == stats


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_term_is_the_chosen_mean_token_nll(loss_type):
    """loss(rpo_alpha) - loss(0) = rpo_alpha * sum over real pairs of -log p(chosen) / |chosen|,
    with log p summed by hand in numpy."""
    batch = tiny_batch()
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    ref_params = jax.tree.map(lambda x: x * 1.05, PARAMS)
    rows = {k: jnp.asarray(v) for k, v in
            dpo.reference_logps(GRAPHDEF, ref_params, batch, 4, mesh, ()).items()}
    plain = jax.jit(dpo.dpo_loss_fn(GRAPHDEF, dpo.DPOConfig(beta=0.5, loss_type=loss_type)))(
        PARAMS, rows)
    rpo = jax.jit(dpo.dpo_loss_fn(GRAPHDEF, dpo.DPOConfig(beta=0.5, loss_type=loss_type,
                                                          rpo_alpha=0.7)))(PARAMS, rows)
    logp = logp_by_hand(PARAMS, batch["chosen"], batch["chosen_mask"])[:3]  # 3 real pairs
    nll = -logp / batch["chosen_mask"].sum(1)[:3]
    assert float(rpo["nll"] - plain["nll"]) == pytest.approx(0.7 * nll.sum(), rel=1e-4)
    assert float(plain["per_token/chosen_nll"]) == pytest.approx(nll.sum(), rel=1e-4)
    assert float(rpo["correct"]) == float(plain["correct"])  # accuracy is the DPO margin's


def test_wilson_interval_textbook_values():
    # 8 of 10: the 95% Wilson score interval is 0.4902 .. 0.9433 (Newcombe 1998, Table I style)
    lo, hi = pairs.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10: 0 .. 0.2775 (the "rule of three"-like upper bound)
    lo, hi = pairs.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"rounds": 0}, "DPOConfig.rounds=0"),
    ({"rpo_alpha": -1.0}, "DPOConfig.rpo_alpha=-1.0"),
])
def test_bad_round_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dpo.DPOConfig(**kwargs)
