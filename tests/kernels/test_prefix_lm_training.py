"""attention_impl="pallas" trains a prefix_lm model exactly like "xla" (the flash kernel's
prefix-LM mask, interpreted on CPU, inside the real jitted train step)."""

import json

import numpy as np

from tests.conftest import run_experiment


def test_prefix_lm_trains_the_same_with_pallas_and_xla():
    proc = run_experiment("tests.kernels.prefix_lm_train_worker", [])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.1 < out["prefix_fraction"] < 0.9  # the batches really carry prefixes
    # Same tolerance as tests/train/test_sharding.py: the online softmax reorders fp32 sums.
    np.testing.assert_allclose(out["pallas"], out["xla"], rtol=0, atol=1e-5)
    # Control: the same batches without the prefix mask give other losses, so the agreement
    # above is agreement on the prefix-LM mask, not on plain causal attention.
    assert np.max(np.abs(np.subtract(out["xla"], out["xla_no_prefix"]))) > 1e-3
