"""The hand-written derivatives of the loss head match autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from llm.model.layers import tied_logits
from llm.train.loss import cross_entropy


def reference_cross_entropy(logits, targets, mask, z_loss):
    """The textbook version: logsumexp, take_along_axis, argmax."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return {"nll": jnp.sum((lse - target) * mask),
            "z_loss": z_loss * jnp.sum(jnp.square(lse) * mask),
            "tokens": jnp.sum(mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * mask)}


def _inputs(seed=0, batch=3, seq=5, vocab=37):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    logits = 3.0 * jax.random.normal(k1, (batch, seq, vocab))
    targets = jax.random.randint(k2, (batch, seq), 0, vocab)
    mask = (jax.random.uniform(k3, (batch, seq)) < 0.7).astype(jnp.float32)
    return logits, targets, mask


def test_cross_entropy_values_match_reference():
    logits, targets, mask = _inputs()
    ours = cross_entropy(logits, targets, mask, z_loss=1e-3)
    ref = reference_cross_entropy(logits, targets, mask, 1e-3)
    for key in ("nll", "z_loss", "tokens", "correct"):
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-6, err_msg=key)


def test_cross_entropy_gradient_matches_autodiff():
    logits, targets, mask = _inputs(seed=1)
    targets = targets.at[0, 0].set(0)

    def total(fn, x):
        s = fn(x, targets, mask, 1e-2)
        return 0.7 * s["nll"] + s["z_loss"]

    ours = jax.grad(lambda x: total(cross_entropy, x))(logits)
    ref = jax.grad(lambda x: total(reference_cross_entropy, x))(logits)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_accuracy_counts_argmax_hits():
    logits = jnp.array([[[0.0, 2.0, 1.0], [5.0, 1.0, 1.0], [0.0, 0.0, 3.0]]])
    targets = jnp.array([[1, 2, 2]])
    out = cross_entropy(logits, targets, jnp.array([[1.0, 1.0, 0.0]]))
    assert float(out["correct"]) == 1.0  # first row hit, second miss, third masked


def test_tied_logits_gradients_match_einsum():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k1, (12, 8))
    table = jax.random.normal(k2, (21, 8))
    cot = jax.random.normal(k3, (12, 21))

    def loss(fn, x, t):
        return jnp.sum(fn(x, t) * cot)

    ours = jax.grad(lambda x, t: loss(tied_logits, x, t), argnums=(0, 1))(x, table)
    ref = jax.grad(lambda x, t: loss(lambda a, b: jnp.einsum("te,ve->tv", a, b), x, t),
                   argnums=(0, 1))(x, table)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert tied_logits(x.astype(jnp.bfloat16), table.astype(jnp.bfloat16)).dtype == jnp.float32
