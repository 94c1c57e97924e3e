"""The pieces behind long RL runs: the adaptive KL controller shared by GRPO and PPO
(RLConfig.target_kl), and the code reward that a short generic body cannot max out
(code_parses_f1), both against hand-computed values."""

import pytest

from llm.config import ConfigError
from llm.posttrain import grpo, ppo, tasks
from llm.posttrain.rl_loop import RLConfig

PROMPT = 'def f(a, b):\n    """Add."""\n'
REFERENCE = "    return a + b\n"  # word tokens: return, a, b


@pytest.mark.parametrize("completion,want", [
    ("    return a\n", 0.2 + 0.8 * 0.8),                 # P = 1, R = 2/3 -> F1 = 0.8
    ("    return a * b * b\n", 0.2 + 0.8 * 6 / 7),       # P = 3/4, R = 1 -> F1 = 6/7
    ("    return a + b\n\nx = 1\n", 1.0),                # the body stops at the next top level
    ("    pass\n", 0.2),                                 # parses, nothing in common
    ("    return (a\n", 0.0),                            # does not parse
    ("", 0.0),                                           # no body
])
def test_code_parses_f1_by_hand(completion, want):
    assert tasks.code_parses_f1(PROMPT, completion, REFERENCE) == pytest.approx(want)
    assert tasks.get_reward("code_parses_f1") is tasks.code_parses_f1


@pytest.mark.parametrize("module", [grpo, ppo])
def test_both_algorithms_adapt_the_kl_coefficient(module):
    rc = RLConfig(prompts_per_step=8, samples_per_prompt=4, target_kl=2.0, kl_horizon=160)
    algo = (module.make_algorithm(None, rc) if module is grpo
            else module.make_algorithm(None, rc, ppo.PPOConfig()))
    # Ziegler et al.: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon), 32 / 160
    assert algo.next_kl_coef(0.1, 6.0) == pytest.approx(0.1 * (1 + 0.2 * 0.2))   # clipped up
    assert algo.next_kl_coef(0.1, 1.8) == pytest.approx(0.1 * (1 - 0.1 * 0.2))   # 1.8/2 - 1
    assert algo.next_kl_coef(0.1, 0.0) == pytest.approx(0.1 * (1 - 0.2 * 0.2))   # clipped down
    fixed = RLConfig(prompts_per_step=8, samples_per_prompt=4)
    algo = (module.make_algorithm(None, fixed) if module is grpo
            else module.make_algorithm(None, fixed, ppo.PPOConfig()))
    assert algo.next_kl_coef(0.1, 50.0) == 0.1  # no target: fixed


def test_kl_target_must_be_positive():
    with pytest.raises(ConfigError, match=r"RLConfig.target_kl=0.0 must be > 0"):
        RLConfig(target_kl=0.0)
    with pytest.raises(ConfigError, match=r"RLConfig.kl_horizon=0 >= 1"):
        RLConfig(target_kl=1.0, kl_horizon=0)
