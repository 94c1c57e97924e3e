"""The pieces behind long RL runs: the adaptive KL controller shared by GRPO and PPO
(RLConfig.target_kl / kl_horizon / kl_coef_min / kl_gain), and the code reward that a short
generic body cannot max out (code_parses_f1), both against hand-computed values."""

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


def make(module, rc):
    return (module.make_algorithm(None, rc) if module is grpo
            else module.make_algorithm(None, rc, ppo.PPOConfig()))


@pytest.mark.parametrize("module", [grpo, ppo])
def test_both_algorithms_adapt_the_kl_coefficient(module):
    rc = RLConfig(prompts_per_step=8, samples_per_prompt=4, target_kl=2.0, kl_horizon=160)
    algo = make(module, rc)
    # Ziegler et al.: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch / horizon), 32 / 160;
    # without kl_gain the coefficient in force is the controller's state itself
    for kl, want in [(6.0, 0.1 * (1 + 0.2 * 0.2)),     # clipped up
                     (1.8, 0.1 * (1 - 0.1 * 0.2)),     # 1.8 / 2 - 1 = -0.1
                     (0.0, 0.1 * (1 - 0.2 * 0.2))]:    # clipped down
        state, used = algo.next_kl_coef(0.1, kl)
        assert state == pytest.approx(want, rel=1e-6) and used == state
    fixed = make(module, RLConfig(prompts_per_step=8, samples_per_prompt=4))
    assert fixed.next_kl_coef(0.1, 50.0) == pytest.approx((0.1, 0.1))  # no target: fixed


def test_floor_and_proportional_term_by_hand():
    """RLConfig.kl_coef_min stops the wind-up (the state never falls below it); kl_gain
    multiplies the state by exp(gain * clip(kl / target - 1, -1, 1)) for the step's update."""
    rc = RLConfig(prompts_per_step=4, samples_per_prompt=4, kl_coef=0.05, target_kl=1.5,
                  kl_horizon=16, kl_coef_min=0.05, kl_gain=3.0)
    algo = grpo.make_algorithm(None, rc)
    # policy = reference (kl 0): the state would drop 20% (0.04) but stays at the floor; the
    # proportional term exp(3 * -1) would take it lower still, and the floor holds it too
    assert algo.next_kl_coef(0.05, 0.0) == pytest.approx((0.05, 0.05))
    # kl 2.25 = 1.5 target x 1.5: error 0.5, state x (1 + 0.2 * 16 / 16), then x exp(1.5)
    state, used = algo.next_kl_coef(0.1, 2.25)
    assert state == pytest.approx(0.12, rel=1e-6)
    assert used == pytest.approx(0.12 * 4.4816891, rel=1e-6)
    # kl 6 = 4 x target: the integral error clips at 0.2, the proportional one at 1 (x e^3)
    state, used = algo.next_kl_coef(0.1, 6.0)
    assert state == pytest.approx(0.12, rel=1e-6)
    assert used == pytest.approx(0.12 * 20.085537, rel=1e-6)
    # kl 1.2: error -0.2 -> state x 0.8 = 0.08, used 0.08 x exp(-0.6) = 0.0439 -> floor 0.05
    assert algo.next_kl_coef(0.1, 1.2) == pytest.approx((0.08, 0.05), rel=1e-6)
    # kl 1.35: error -0.1 -> state 0.09, used 0.09 x exp(-0.3) = 0.06667
    assert algo.next_kl_coef(0.1, 1.35) == pytest.approx((0.09, 0.09 * 0.7408182), rel=1e-6)


def test_kl_target_must_be_positive():
    with pytest.raises(ConfigError, match=r"RLConfig.target_kl=0.0 must be > 0"):
        RLConfig(target_kl=0.0)
    with pytest.raises(ConfigError, match=r"RLConfig.kl_horizon=0 >= 1"):
        RLConfig(target_kl=1.0, kl_horizon=0)
    with pytest.raises(ConfigError, match=r"RLConfig.kl_coef_min=0.2 must be between 0 and "
                                          r"RLConfig.kl_coef=0.05"):
        RLConfig(kl_coef=0.05, kl_coef_min=0.2)
    with pytest.raises(ConfigError, match=r"RLConfig.kl_gain=-1.0 must be >= 0"):
        RLConfig(kl_gain=-1.0)
    with pytest.raises(ConfigError, match=r"RLConfig.kl_gain=3.0 is GRPO's"):
        ppo.make_algorithm(None, RLConfig(target_kl=1.0, kl_gain=3.0), ppo.PPOConfig())


def test_kl_tracking_summary_by_hand():
    from tools.rlhf_report import kl_tracking

    kls = [0.0] * 20 + [1.5, 3.5, 0.5, 1.0]  # steps 21-24 after the approach
    got = kl_tracking(kls, target=1.5)
    assert got["kl_max"] == 3.5 and got["kl_max_step"] == 22
    assert got["kl_abs_err"] == pytest.approx((0 + 2 + 1 + 0.5) / 4)
    assert got["kl_in_band"] == 0.5  # 1.5 and 1.0 lie in [0.75, 3]
    assert got["kl_steps_above_2x"] == 1
