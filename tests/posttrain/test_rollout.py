"""Rollouts: top-p sampling, the prompt/response layout, and the KV-cache sampler's log-probs
against recomputing the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from llm.data.objectives import EOS_ID, PAD_ID
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.posttrain.context import sequence_logprobs
from llm.posttrain.rollout import assemble, rollout
from llm.serve.sampler import sample_token


def test_top_p_keeps_the_nucleus_only():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (4000, 4)))
    # cumulative mass before each token: 0, 0.5, 0.8, 0.95 -> top_p 0.7 keeps tokens 0 and 1,
    # renormalised to 0.5/0.8 and 0.3/0.8.
    tok = np.asarray(sample_token(logits, jax.random.key(0), 1.0, 0, top_p=0.7))
    assert set(tok.tolist()) == {0, 1}
    assert abs((tok == 0).mean() - 0.625) < 0.03
    tok = np.asarray(sample_token(logits, jax.random.key(0), 1.0, 0, top_p=1.0))
    assert set(tok.tolist()) == {0, 1, 2, 3}
    tok = np.asarray(sample_token(logits, jax.random.key(0), 1.0, 0, top_p=0.01))
    assert set(tok.tolist()) == {0}  # the most likely token always stays


def test_assemble_lays_out_prompt_then_response():
    padded = np.array([[5, 6, 7], [8, PAD_ID, PAD_ID]], np.int32)
    lengths = np.array([3, 1], np.int32)
    new = np.array([[9, EOS_ID, PAD_ID], [10, 11, 12]], np.int32)
    logp = np.array([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]], np.float32)
    ro = assemble(padded, lengths, new, logp)
    np.testing.assert_array_equal(ro.tokens, [[5, 6, 7, 9, EOS_ID, PAD_ID],
                                              [8, 10, 11, 12, PAD_ID, PAD_ID]])
    np.testing.assert_array_equal(ro.response_mask, [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(ro.logprobs, [[0, 0, 0, -1, -2, 0], [0, -3, -4, -5, 0, 0]])
    assert ro.responses == [[9], [10, 11, 12]]
    np.testing.assert_array_equal(ro.response_lengths, [2, 3])


def test_kv_cache_logprobs_equal_the_full_forward():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=64, attention_impl="xla")
    graphdef, abstract, _ = transformer.abstract(cfg)
    rng = np.random.default_rng(1)  # random weights, no init program to compile
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), abstract)
    prompts = [[PAD_ID, 5, 6, 7, 8], [PAD_ID, 9], [PAD_ID, 10, 11, 12, 13, 14, 15, 16, 17]]
    ro = rollout(graphdef, params, cfg, prompts, max_prompt_len=6, max_new_tokens=7,
                 rng=jax.random.key(3), temperature=0.7, eos_id=2)
    assert ro.tokens.shape == (3, 13) and ro.truncated == 1
    np.testing.assert_array_equal(ro.tokens[2, :6], [12, 13, 14, 15, 16, 17])  # kept the end
    np.testing.assert_array_equal(ro.tokens[1, :2], [PAD_ID, 9])
    full = jax.jit(lambda p, t, m: sequence_logprobs(graphdef, p, t, m, temperature=0.7))(
        params, jnp.asarray(ro.tokens), jnp.asarray(ro.response_mask))
    np.testing.assert_allclose(np.asarray(full), ro.logprobs, atol=2e-5)
    assert ro.response_mask.sum() > 0 and np.all(ro.logprobs <= 0)
