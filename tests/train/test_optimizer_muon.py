"""make_optimizer(name="muon"): Muon on the hidden weight matrices, AdamW on the rest."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.train.optimizer import make_optimizer, muon_dimensions


def _params():
    ks = jax.random.split(jax.random.key(0), 4)
    return {"embed": {"embedding": jax.random.normal(ks[0], (50, 16))},
            "layer_0": {"attn": {"q": {"kernel": jax.random.normal(ks[1], (16, 4, 8))},
                                 "o": {"kernel": jax.random.normal(ks[2], (4, 8, 16))}},
                        "mlp": {"wi": {"kernel": jax.random.normal(ks[3], (16, 48))}},
                        "attn_norm": {"scale": jnp.ones((16,))}}}


def _second_update(params, grads):
    """The second update (the schedule's first step has learning rate 0)."""
    gin.clear_config()
    gin.parse_config(["learning_rate_schedule.peak = 1.0", "learning_rate_schedule.warmup_steps "
                      "= 1", "learning_rate_schedule.final_ratio = 1.0"])
    try:
        tx, _ = make_optimizer(total_steps=10, name="muon", weight_decay=0.0, clip_norm=None)
        update = jax.jit(tx.update)
        _, state = update(grads, tx.init(params), params)
        updates, _ = update(grads, state, params)
    finally:
        gin.clear_config()
    return updates


def test_muon_orthogonalises_matrices_and_adam_updates_the_rest():
    params = _params()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    up = _second_update(params, grads)
    # Hidden matrices: the update, as the matrix Muon sees ([in, out]), has nearly equal
    # singular values (Newton-Schulz approximates U V^T of the momentum).
    for u, shape in ((up["layer_0"]["mlp"]["wi"]["kernel"], (16, 48)),
                     (up["layer_0"]["attn"]["q"]["kernel"], (16, 32)),
                     (up["layer_0"]["attn"]["o"]["kernel"], (32, 16))):
        s = np.linalg.svd(np.asarray(u).reshape(shape), compute_uv=False)
        assert s.min() / s.max() > 0.5, s
    # Embedding and norm: Adam with Nesterov momentum (optax.contrib.muon's Adam side). With a
    # constant gradient g, after 2 steps: v_hat = g^2, and the Nesterov first moment is
    # b1 * m_2 / (1 - b1^3) + (1 - b1) * g / (1 - b1^2), m_2 = (1 - b1^2) g; lr 1.
    b1 = 0.9
    nesterov = b1 * (1 - b1**2) / (1 - b1**3) + (1 - b1) / (1 - b1**2)
    for u, g in ((up["embed"]["embedding"], grads["embed"]["embedding"]),
                 (up["layer_0"]["attn_norm"]["scale"], grads["layer_0"]["attn_norm"]["scale"])):
        np.testing.assert_allclose(u, -nesterov * np.sign(g), rtol=1e-3)  # eps: tiny |g|


def test_muon_dimensions_of_the_attention_output():
    dims = muon_dimensions(_params())
    assert dims["embed"]["embedding"] is None
    assert dims["layer_0"]["attn_norm"]["scale"] is None
    assert tuple(np.atleast_1d(dims["layer_0"]["attn"]["o"]["kernel"].reduction_axis)) == (0, 1)
    assert dims["layer_0"]["attn"]["q"]["kernel"].output_axis == (1, 2)


def test_unknown_optimizer_name_is_an_error():
    with pytest.raises(ValueError, match="make_optimizer.name='sgd'"):
        make_optimizer(total_steps=10, name="sgd")
