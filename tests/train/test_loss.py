"""The hand-written derivatives of the loss head match autodiff of the plain formulas, and the
chunked head (which never holds the logits) matches the full one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import transformer
from llm.model.config import ModelConfig
from llm.model.layers import tied_logits
from llm.train.loss import chunked_cross_entropy, cross_entropy, decoder_loss


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


@pytest.mark.parametrize("vocab_major, chunk", [(True, 4), (False, 7)])  # 7 pads seq 10
def test_chunked_head_matches_the_full_logits(vocab_major, chunk):
    """Values and gradients (w.r.t. hidden states and the projection) of the chunked head equal
    the textbook cross entropy of the full logits x . w, with z-loss and a mask."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(k1, (2, 10, 16))
    table = 0.5 * jax.random.normal(k2, (37, 16))
    w = table if vocab_major else table.T
    targets = jax.random.randint(k3, (2, 10), 0, 37)
    mask = (jax.random.uniform(k4, (2, 10)) < 0.8).astype(jnp.float32)

    def ref(x, w):
        logits = jnp.einsum("bsd,vd->bsv", x, w if vocab_major else w.T)
        s = reference_cross_entropy(logits, targets, mask, 1e-2)
        return s["nll"] + s["z_loss"], s

    def ours(x, w):
        s = chunked_cross_entropy(x, w, targets, mask, vocab_major=vocab_major, chunk=chunk,
                                  z_loss=1e-2)
        return s["nll"] + s["z_loss"], s

    (_, want), want_grads = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(x, w)
    (_, got), got_grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(x, w)
    for key in ("nll", "z_loss", "tokens", "correct"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-6, err_msg=key)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Evaluation (no gradient) takes the primal path: the same sums.
    np.testing.assert_allclose(jax.jit(ours)(x, w)[1]["nll"], want["nll"], rtol=2e-6)


def test_chunked_decoder_loss_trains_like_the_full_one():
    """decoder_loss(chunk=...) on a tiny untied decoder: the same sums and parameter gradients
    as the unchunked loss (the full model, through `Decoder.features` / `head_weight`)."""
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                      tie_embeddings=False)
    graphdef, params = transformer.init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (2, 13)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((2, 12), np.float32), "segment_ids": np.ones((2, 12), np.int32),
             "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))}

    def grads(loss_fn):
        return jax.jit(jax.grad(lambda p: (lambda s: (s["nll"], s))(loss_fn(p, batch)),
                                has_aux=True))(params)

    full_g, full = grads(decoder_loss(graphdef))
    chunk_g, chunked = grads(decoder_loss(graphdef, chunk=5))
    for key in ("nll", "tokens", "correct"):
        np.testing.assert_allclose(chunked[key], full[key], rtol=2e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(chunk_g), jax.tree.leaves(full_g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
