"""GRPO on two CPU processes (jax.distributed on loopback, gloo collectives; one device each)
reproduces one process driving the same 2-device mesh: the same sampled batches (rewards), the
same KL, losses and gradient norms per step, the same held-out figures and the same final
policy. Rollouts, rewards and the prompt order run on every process; the batch-split arrays the
host reads (per-sequence KL and entropy, held-out log-probs) are all-gathered
(`rl_loop.to_host`)."""

import numpy as np
import pytest

from llm.train.metrics import read_metrics
from tests.conftest import finish_processes, launch_processes, run_experiment
from tests.posttrain.test_rlhf import LOADED, read_json, rl_args

pytestmark = pytest.mark.slow  # three RL processes

COMPARED = ("reward", "reward_std", "kl", "kl_k3", "entropy", "response_length", "loss",
            "policy_loss", "grad_norm", "kl_coef")


def test_two_processes_match_one_process(tiny_run, tmp_path):
    def args(run_dir):
        return rl_args("grpo_tiny", tiny_run, str(run_dir), "--gin_param=RLConfig.steps=2",
                       "--gin_param=checkpoint_manager.save_every=1")

    run_experiment("experiments.rlhf", args(tmp_path / "one"), timeout=LOADED,
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    finish_processes(launch_processes("experiments.rlhf", args(tmp_path / "two")), timeout=LOADED)

    one = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    two = read_metrics(str(tmp_path / "two" / "metrics.jsonl"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for key in COMPARED:
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=0,
                                   atol=1e-5, err_msg=key)
    ev1, ev2 = read_json(str(tmp_path / "one" / "eval.json")), read_json(
        str(tmp_path / "two" / "eval.json"))
    for key in ("reward_policy", "reward_reference", "kl_policy", "kl_k3_policy"):
        assert ev2[key] == pytest.approx(ev1[key], abs=1e-4), key
    assert read_json(str(tmp_path / "two" / "manifest.json"))["devices"]["processes"] == 2
    # the checkpoints the two processes wrote together restore onto this one process
    import jax

    from llm.runs import load_run

    one_run, two_run = load_run(str(tmp_path / "one")), load_run(str(tmp_path / "two"))
    assert one_run.step == two_run.step == 2
    for a, b in zip(jax.tree.leaves(one_run.params), jax.tree.leaves(two_run.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
