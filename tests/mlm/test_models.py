"""The new attention patterns and models: prefix-LM (bidirectional prefix, causal rest), the
bidirectional encoder, the encoder-decoder's causal decoder and segment-respecting
cross-attention, exact-span accuracy, and logical axes the mesh rule sets map."""

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import transformer
from llm.model.attention import attend
from llm.model.config import ModelConfig
from llm.model.encoder_decoder import Encoder, EncoderDecoder
from llm.parallel.rules import axis_rules
from llm.train.loss import span_exact_match
from tests.conftest import REPO

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64)
SEQ = 12


def changed(a, b) -> np.ndarray:
    """Positions [seq] whose logits differ."""
    return np.asarray(jnp.abs(a - b).max(axis=-1)[0] > 1e-6)


def perturb(ids, i):
    return ids.at[0, i].set((ids[0, i] + 7) % CFG.vocab_size)


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(1), (1, SEQ), 3, CFG.vocab_size)


def test_prefix_lm_attention(ids):
    graphdef, params = transformer.init(CFG, jax.random.key(0))
    k = 4  # positions 0..4 are the prefix
    prefix = (jnp.arange(SEQ) <= k).astype(jnp.int32)[None]
    apply = jax.jit(lambda x, prefix: transformer.apply(graphdef, params, x, prefix=prefix))

    base = apply(ids, prefix)
    # A prefix token is seen by the whole prefix (also earlier positions) and everything after.
    np.testing.assert_array_equal(changed(base, apply(perturb(ids, 2), prefix)),
                                  np.ones(SEQ, bool))
    # A suffix token is seen only by itself and later positions (causal).
    np.testing.assert_array_equal(changed(base, apply(perturb(ids, 7), prefix)),
                                  np.arange(SEQ) >= 7)
    # With an empty prefix the same model is causal everywhere.
    none = jnp.zeros_like(prefix)
    np.testing.assert_array_equal(changed(apply(ids, none), apply(perturb(ids, 2), none)),
                                  np.arange(SEQ) >= 2)


def test_prefix_lm_works_with_pallas():
    """The flash kernel has the prefix-LM mask (more cases in tests/kernels)."""
    q = jax.random.normal(jax.random.key(2), (1, 8, 2, 16))
    prefix = (jnp.arange(8) < 5).astype(jnp.int32)[None]
    with jax.default_matmul_precision("highest"):
        got, want = (attend(q, q, q, segment_ids=None, causal=True, impl=impl, prefix=prefix)
                     for impl in ("pallas", "xla"))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_encoder_is_bidirectional_within_segments(ids):
    graphdef, params = transformer.init(CFG, jax.random.key(0), Encoder)
    seg = jnp.asarray([[1] * 7 + [2] * 5])
    logits = jax.jit(lambda x: transformer.apply(graphdef, params, x, segment_ids=seg))

    base = logits(ids)
    assert base.shape == (1, SEQ, CFG.vocab_size)
    np.testing.assert_array_equal(changed(base, logits(perturb(ids, 5))), np.arange(SEQ) < 7)
    np.testing.assert_array_equal(changed(base, logits(perturb(ids, 9))), np.arange(SEQ) >= 7)


def test_encoder_decoder_masks(ids):
    graphdef, params = transformer.init(CFG, jax.random.key(0), EncoderDecoder)
    enc_seg = jnp.asarray([[1] * 7 + [2] * 5])
    dec = jax.random.randint(jax.random.key(2), (1, 6), 3, CFG.vocab_size)
    dec_seg = jnp.asarray([[1, 1, 1, 2, 2, 2]])

    logits = jax.jit(lambda e, d: transformer.apply(graphdef, params, e, d,
                                                    encoder_segment_ids=enc_seg,
                                                    decoder_segment_ids=dec_seg))

    base = logits(ids, dec)
    assert base.shape == (1, 6, CFG.vocab_size)
    # Decoder: causal within its segment.
    np.testing.assert_array_equal(changed(base, logits(ids, perturb(dec, 1))),
                                  [False, True, True, False, False, False])
    # Cross-attention: decoder tokens see only the encoder tokens of their own example.
    np.testing.assert_array_equal(changed(base, logits(perturb(ids, 3), dec)), [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(changed(base, logits(perturb(ids, 10), dec)), [0, 0, 0, 1, 1, 1])


def test_span_exact_match_counts_whole_spans():
    targets = jnp.asarray([[9, 5, 6, 8, 7, 1, 0], [9, 4, 8, 3, 3, 3, 1]])
    span_ids = jnp.asarray([[0, 1, 1, 0, 2, 0, 0], [0, 1, 0, 2, 2, 2, 0]])
    pred = targets.at[0, 2].set(0).at[1, 4].set(0)  # span 1 of row 0, span 2 of row 1 wrong
    logits = jax.nn.one_hot(pred, 16)
    out = span_exact_match(logits, targets, span_ids)
    assert float(out["spans"]) == 4 and float(out["spans_exact"]) == 2


@pytest.mark.parametrize("module", [Encoder, EncoderDecoder])
@pytest.mark.parametrize("mesh", ["fsdp", "tp", "fsdp_tp"])
def test_new_parameters_are_sharded_by_the_rule_sets(module, mesh):
    """Every parameter's logical axes are names the rule sets know, and each rule set shards the
    cross-attention and MLM-head matrices (not silently replicated; vectors such as biases may
    stay replicated, as in the decoder)."""
    _, _, axes = transformer.abstract(CFG, module)
    gin.clear_config()
    gin.parse_config_file(os.path.join(REPO, f"gin_configs/mesh/{mesh}.gin"),
                          skip_unknown=True)
    rules = dict(axis_rules())
    gin.clear_config()
    known = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", None}
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, names in flat:
        assert set(names) <= known, (path, names)
    new = {jax.tree_util.keystr(p): n for p, n in flat if len(n) >= 2 and (
        "cross" in jax.tree_util.keystr(p) or "head" in jax.tree_util.keystr(p))}
    assert new, "no new parameters found"
    for path, names in new.items():
        assert any(rules.get(n) for n in names if n), (mesh, path, names)


def test_encoder_decoder_pallas_matches_xla():
    """Cross-attention (q_len != kv_len, packed segments) through the Pallas flash kernel
    (interpret mode on CPU) gives the xla logits."""
    import dataclasses

    cfg = dataclasses.replace(CFG, d_model=64, num_layers=1)  # head_dim 16 for the kernel
    graphdef, params = transformer.init(cfg, jax.random.key(0), EncoderDecoder)
    pallas, _ = transformer.init(dataclasses.replace(cfg, attention_impl="pallas"),
                                 jax.random.key(0), EncoderDecoder)
    enc = jax.random.randint(jax.random.key(1), (2, 128), 3, cfg.vocab_size)
    dec = jax.random.randint(jax.random.key(2), (2, 32), 3, cfg.vocab_size)
    kw = dict(encoder_segment_ids=jnp.asarray([[1] * 100 + [2] * 28] * 2),
              decoder_segment_ids=jnp.asarray([[1] * 20 + [2] * 12] * 2))
    want = transformer.apply(graphdef, params, enc, dec, **kw)
    got = transformer.apply(pallas, params, enc, dec, **kw)
    np.testing.assert_allclose(got, want, atol=1e-5)
