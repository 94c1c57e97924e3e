"""Pruning masks: 2:4 structure, per-layer sparsity, Wanda scores by hand."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llm.compress import prune
from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.model import transformer
from llm.model.config import ModelConfig

CFG = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  vocab_size=128)


@pytest.fixture(scope="module")
def model():
    _, params = transformer.init(CFG, jax.random.key(0))
    _, _, axes = transformer.abstract(CFG)
    return params, axes


def _flat(tree):
    return {"/".join(Q._path_names(p)): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_wanda_scores_and_mask_by_hand():
    w2 = np.array([[1.0, -2.0], [3.0, 0.5], [-0.5, 1.0], [2.0, -4.0]])  # [K=4, N=2]
    norms = np.array([2.0, 1.0, 4.0, 0.25])
    # |W| * ||X_k||: column 0 -> [2, 3, 2, 0.5]; column 1 -> [4, 0.5, 4, 1]
    np.testing.assert_allclose(prune.wanda_scores(w2, norms),
                               [[2.0, 4.0], [3.0, 0.5], [2.0, 4.0], [0.5, 1.0]])
    keep = prune.mask_2d(w2, "wanda", 0.5, norms)
    # per output column drop the 2 lowest: col 0 drops rows 3 and (tie 0/2, stable) 0
    np.testing.assert_array_equal(keep, [[False, True], [True, False], [True, True],
                                         [False, False]])
    # magnitude (per layer, global): drops the 4 smallest |w|: 0.5, 0.5(-), 1.0, 1.0 -> by value
    mag = prune.mask_2d(w2, "magnitude", 0.5)
    assert mag.sum() == 4 and not mag[1, 1] and not mag[2, 0] and mag[3, 1] and mag[1, 0]


def test_two_of_four_exactly_two_zero_in_every_four(model):
    params, axes = model
    masks = prune.compute_masks(params, axes, "2:4")
    assert len(masks) == 2 * 7
    for key, mask in masks.items():
        dims = Q.contraction_dims(tuple(key.split("/")), _axes(axes, key))
        m2 = np.asarray(Q.to_2d(mask, dims))
        kept = m2.reshape(m2.shape[0] // 4, 4, -1).sum(axis=1)
        assert np.all(kept == 2), key


def _axes(axes, key):
    node = axes
    for k in key.split("/"):
        node = node[k]
    return node


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_requested_sparsity_reached_per_layer(model, method):
    params, axes = model
    rng = np.random.default_rng(0)
    grams = {k: np.diag(rng.uniform(0.5, 2.0, size=n))
             for k, n in ((k, int(np.prod([v.shape[d] for d in dims]))) for k, dims, v in
                          ((k, d, _flat(params)[k])
                           for k, d in prune.prunable(params, axes).items()))}
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        masks = prune.compute_masks(params, axes, method, sparsity, grams)
        pruned = _flat(prune.apply_masks(params, masks))
        for key in masks:
            frac = np.mean(pruned[key] == 0)
            assert abs(frac - sparsity) < 0.02, (key, frac, sparsity)
    # norms, embeddings untouched
    assert np.all(_flat(prune.apply_masks(params, masks))["embed/embedding"] != 0)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_one_line_error(model, sparsity):
    params, axes = model
    with pytest.raises(ConfigError) as e:
        prune.compute_masks(params, axes, "magnitude", sparsity)
    assert "[0, 1)" in str(e.value) and "\n" not in str(e.value)


def test_recovery_finetune_keeps_mask_and_lowers_loss(tiny_data):
    from llm.compress import finetune

    cfg = ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                      vocab_size=512)
    graphdef, params = transformer.init(cfg, jax.random.key(0))
    _, _, axes = transformer.abstract(cfg)
    masks = prune.compute_masks(params, axes, "magnitude", 0.5)
    tuned, losses = finetune.finetune(graphdef, prune.apply_masks(params, masks),
                                      finetune.mask_transform(masks), data_dir=tiny_data,
                                      steps=6, seq_len=32, batch_size=4, learning_rate=1e-2)
    flat_before, flat_after = _flat(params), _flat(tuned)
    for key, mask in masks.items():
        assert np.all(flat_after[key][~mask] == 0), key
        assert np.any(flat_after[key][mask] != flat_before[key][mask]), key  # it did train
    assert losses[-1] < losses[0]


def test_scope_output_prunes_each_output_channel_equally():
    w2 = np.random.default_rng(4).normal(size=(16, 6)) * np.array([0.1, 1, 1, 1, 1, 10])
    per_layer = prune.mask_2d(w2, "magnitude", 0.5)
    per_output = prune.mask_2d(w2, "magnitude", 0.5, scope="output")
    assert np.all(per_output.sum(axis=0) == 8)  # 8 of 16 kept in every column
    assert per_layer[:, 0].sum() < 8 < per_layer[:, 5].sum()  # per layer: small column loses
    norms = np.ones(16)
    np.testing.assert_array_equal(prune.mask_2d(w2, "wanda", 0.5, norms, scope="layer"),
                                  per_layer)  # equal norms: Wanda per layer = magnitude


def test_sequential_masks_calibrate_later_blocks_on_the_pruned_model(model):
    params, axes = model
    graphdef, _, _ = transformer.abstract(CFG)
    rng = np.random.default_rng(5)
    batches = [{"inputs": rng.integers(0, CFG.vocab_size, size=(2, 16)).astype(np.int32),
                "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
                "segment_ids": np.ones((2, 16), np.int32)}]
    from llm.compress import calibrate

    grams, _ = calibrate.gram_matrices(graphdef, params, batches)
    one_shot = prune.compute_masks(params, axes, "wanda", 0.6, grams)
    seq = prune.sequential_masks(graphdef, params, axes, "wanda", 0.6, batches)
    assert set(seq) == set(one_shot)
    for key in seq:  # block 0 sees the same inputs; block 1 sees block 0 pruned
        if key.startswith("layer_0/"):
            np.testing.assert_array_equal(seq[key], one_shot[key])
    assert any(not np.array_equal(seq[k], one_shot[k]) for k in seq if k.startswith("layer_1/"))


def _output_error(x, w, keep):
    """||XW - X(W*M)||_F^2 / ||XW||_F^2 straight from the inputs (plain numpy)."""
    return np.sum((x @ w - x @ (w * keep)) ** 2) / np.sum((x @ w) ** 2)


def test_wanda_beats_magnitude_on_a_layer_with_outlier_features():
    """Wanda's premise (Sun et al. 2023): when a few input features are far larger than the
    rest (LLMs' emergent outliers, 20-100x the median norm, Dettmers et al. 2022), |W| alone
    prunes weights whose removal costs the most output. Plain numpy: X [512, 64] with 2
    features at 50x, ordinary weights W [64, 32]; the 50% masks are scored by the output error
    on X. Without outliers the two criteria are about equal (our trained models' case)."""
    from tools.wanda_outliers import outlier_factors, relative_output_error

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 64))
    w = rng.normal(size=(64, 32))
    outliers = [5, 40]

    def masks(x):
        norms = np.linalg.norm(x, axis=0)
        return prune.mask_2d(w, "magnitude", 0.5), prune.mask_2d(w, "wanda", 0.5, norms)

    mag, wanda = masks(x)
    assert 0.8 < _output_error(x, w, wanda) / _output_error(x, w, mag) < 1.25
    c = outlier_factors(np.linalg.norm(x, axis=0), np.array(outliers), 50.0)
    xo = x * c
    norms = np.linalg.norm(xo, axis=0)
    np.testing.assert_allclose(norms[outliers], 50 * np.median(np.linalg.norm(x, axis=0)))
    mag, wanda = masks(xo)
    assert _output_error(xo, w, wanda) < 0.1 * _output_error(xo, w, mag)
    assert wanda[outliers].mean() > 0.9 > 0.7 > mag[outliers].mean()  # magnitude drops ~half
    for keep in (mag, wanda):  # the tool's Gram form is the same error
        np.testing.assert_allclose(relative_output_error(w, keep, xo.T @ xo),
                                   _output_error(xo, w, keep), rtol=1e-9)


def test_wanda_mask_is_unchanged_when_scales_move_from_weights_to_inputs():
    """X' = X diag(c), W' = diag(1/c) W computes the same outputs; Wanda's |W'| ||X'_k|| is the
    same score, so its mask is unchanged, while magnitude's mask follows the rescaling."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(256, 48)), rng.normal(size=(48, 16))
    c = np.exp(rng.uniform(-3, 3, size=48))
    xs, ws = x * c, w / c[:, None]
    np.testing.assert_allclose(xs @ ws, x @ w, atol=1e-9)
    np.testing.assert_array_equal(
        prune.mask_2d(ws, "wanda", 0.5, np.linalg.norm(xs, axis=0)),
        prune.mask_2d(w, "wanda", 0.5, np.linalg.norm(x, axis=0)))
    assert not np.array_equal(prune.mask_2d(ws, "magnitude", 0.5),
                              prune.mask_2d(w, "magnitude", 0.5))
