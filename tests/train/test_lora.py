"""LoRA / QLoRA (llm/train/lora.py): the adapted model against hand computations, the frozen base,
adapter-only checkpoints through the real CLI, and QLoRA against LoRA on the dequantized base."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from llm.compress import quantize as Q
from llm.config import ConfigError
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.train import lora
from llm.train.loss import decoder_loss
from llm.train.state import TrainState
from llm.train.step import train_step
from tests.conftest import run_experiment, tiny_run_args

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, tie_embeddings=False)


@pytest.fixture(scope="module")
def model():
    graphdef, abstract_params, axes = transformer.abstract(CFG)
    params = jax.jit(lambda k: transformer.init(CFG, k)[1])(jax.random.key(0))
    return graphdef, abstract_params, axes, params


_APPLY = {}


def _apply(graphdef, params, ids):
    """transformer.apply, jitted once for the module (every call here has the same shapes)."""
    if "fn" not in _APPLY:
        _APPLY["fn"] = jax.jit(lambda p, x: transformer.apply(graphdef, p, x))
    return _APPLY["fn"](params, ids)


def _plan(model, **kw) -> lora.LoraPlan:
    graphdef, abstract_params, axes, _ = model
    return lora.make_plan(graphdef, abstract_params, axes, lora.LoraConfig(enabled=True, **kw))


def _random_adapters(plan, seed=1):
    """Adapters with a non-zero b (a trained adapter), so the update is not trivially zero."""
    adapters = lora.init_adapters(plan, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves)])


def _tokens(batch=2, seq=8):
    return jax.random.randint(jax.random.key(7), (batch, seq), 0, CFG.vocab_size)


def test_disabled_is_none_and_regex_selects_paths(model):
    graphdef, abstract_params, axes, _ = model
    assert lora.make_plan(graphdef, abstract_params, axes, lora.LoraConfig()) is None
    plan = _plan(model, targets=r"attn/(q|v)/kernel")
    assert [t.name for t in plan.targets] == [
        "layer_0/attn/q/kernel", "layer_0/attn/v/kernel",
        "layer_1/attn/q/kernel", "layer_1/attn/v/kernel"]
    o = _plan(model, targets=r"layer_1/attn/o/").targets[0]  # [heads, head_dim, embed]
    assert (o.in_shape, o.out_shape, o.in_axes, o.out_axes) == (
        (4, 8), (32,), ("heads", "head_dim"), ("embed",))
    axes_tree = lora.adapter_axes(plan, axes)
    assert axes_tree["layer_0"]["attn"]["q"]["kernel"] == {
        "a": ("embed", None), "b": (None, "heads", "head_dim")}


def test_regex_matching_nothing_is_a_config_error(model):
    with pytest.raises(ConfigError) as e:
        _plan(model, targets="attn/qkv_proj")
    msg = str(e.value)
    assert "\n" not in msg and "'attn/qkv_proj'" in msg and "layer_0/attn/k/kernel" in msg
    with pytest.raises(ConfigError, match="matches no projection"):  # norms are not projections
        _plan(model, targets="attn_norm")


def test_zero_b_gives_exactly_the_base_output(model):
    graphdef, _, _, params = model
    plan = _plan(model)
    adapters = lora.init_adapters(plan, jax.random.key(3))
    assert all(np.any(np.asarray(t["a"]) != 0) for t in _leaves_ab(plan, adapters))
    ids = _tokens()
    base = _apply(graphdef, params, ids)
    adapted = _apply(graphdef, lora.combine(plan, adapters, params), ids)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def _leaves_ab(plan, adapters):
    return [lora._get(adapters, t.path) for t in plan.targets]


def test_rank_alpha_scaling_against_hand_computation(model):
    """y = x W + (alpha / r) (x A) B, computed in numpy on the activations (the form of the
    LoRA paper), equals the Dense output with the combined kernel."""
    _, _, _, params = model
    rank, alpha = 4, 12.0
    plan = _plan(model, targets=r"layer_0/attn/o/kernel|layer_1/mlp/wi/kernel", rank=rank,
                 alpha=alpha)
    adapters = _random_adapters(plan)
    combined = lora.combine(plan, adapters, params)
    rng = np.random.default_rng(0)
    for t in plan.targets:
        w = np.asarray(lora._get(params, t.path), np.float64)
        ab = lora._get(adapters, t.path)
        a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
        k, n = int(np.prod(t.in_shape)), int(np.prod(t.out_shape))
        x = rng.normal(size=(5, k))
        expect = x @ w.reshape(k, n) + (alpha / rank) * ((x @ a.reshape(k, rank))
                                                         @ b.reshape(rank, n))
        got = x @ np.asarray(lora._get(combined, t.path), np.float64).reshape(k, n)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, x @ w.reshape(k, n), atol=1e-4)  # the update is not tiny
    # untouched parameters are the very same arrays
    assert combined["layer_1"]["attn"]["q"]["kernel"] is params["layer_1"]["attn"]["q"]["kernel"]


def test_merged_equals_unmerged_and_unmerge_restores_the_base(model):
    graphdef, _, _, params = model
    plan = _plan(model)
    adapters = _random_adapters(plan)
    ids = _tokens()
    unmerged = jax.jit(lambda a, p: transformer.apply(graphdef, lora.combine(plan, a, p), ids))
    merged_params = jax.jit(lambda a, p: lora.merge(plan, a, p))(adapters, params)
    merged = _apply(graphdef, merged_params, ids)
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(unmerged(adapters, params)))
    base = _apply(graphdef, params, ids)
    assert float(jnp.max(jnp.abs(merged - base))) > 1e-3  # the adapters change the output
    restored = lora.unmerge(plan, adapters, merged_params)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        y = restored
        for k in path:
            y = y[k.key]
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)


def test_base_gets_no_update_and_no_optimizer_state(model):
    graphdef, abstract_params, _, params = model
    plan = _plan(model, targets=r"attn/(q|v)/kernel", rank=2, dropout=0.25)
    adapters = lora.init_adapters(plan, jax.random.key(1))
    tx = optax.adam(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                       opt_state=tx.init(adapters))
    opt_floats = sum(x.size for x in jax.tree.leaves(state.opt_state)
                     if jnp.issubdtype(x.dtype, jnp.floating))
    assert opt_floats == 2 * lora.num_trainable(plan, abstract_params)  # Adam's mu and nu only
    assert lora.num_trainable(plan, abstract_params) == 2 * 2 * ((32 + 32) + (32 + 16))
    ids = _tokens(4, 16)
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, 1), "loss_mask": jnp.ones_like(ids),
             "positions": jnp.broadcast_to(jnp.arange(16), ids.shape),
             "segment_ids": jnp.ones_like(ids)}
    frozen = jax.tree.map(jnp.copy, params)
    step = jax.jit(lambda s, b, f: train_step(
        s, b, f, loss_fn=lora.adapted_loss(plan, decoder_loss(graphdef), seed=0), tx=tx,
        schedule=lambda _: 1e-2))
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 frozen, params)
    b = state.params["layer_0"]["attn"]["q"]["kernel"]["b"]
    assert float(jnp.max(jnp.abs(b))) > 0  # the adapters did move


def test_dropout_drops_input_features(model):
    _, _, _, params = model
    plan = _plan(model, targets=r"layer_0/mlp/wi/kernel", dropout=0.5, rank=3, alpha=3.0)
    adapters = _random_adapters(plan)
    t = plan.targets[0]
    ab = lora._get(adapters, t.path)
    d = np.asarray(lora.delta(plan, t, ab, jax.random.key(5)))
    full = np.asarray(ab["a"]) @ np.asarray(ab["b"])  # alpha / rank = 1
    dropped = np.all(d == 0, axis=1)
    assert 0 < dropped.sum() < len(dropped)
    np.testing.assert_allclose(d[~dropped], 2.0 * full[~dropped], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(lora.delta(plan, t, ab)), full)  # no rng: no drop


@pytest.mark.parametrize("method,group", [("nf4", 16), ("int8", 64)])
def test_qlora_forward_equals_lora_on_the_dequantized_base(model, method, group):
    graphdef, _, _, params = model
    plan = _plan(model, quant=method, group_size=group)
    adapters = _random_adapters(plan)
    frozen = lora.freeze(plan, params)
    assert all(Q.is_qarray(lora._get(frozen, t.path)) for t in plan.targets)
    dequantized = params
    for t in plan.targets:  # independently: quantize + dequantize each kernel with the library
        w = lora._get(params, t.path)
        q = Q.quantize(w, tuple(range(len(t.in_shape))), method, group_size=group)
        dequantized = lora._set(dequantized, t.path, Q.dequantize(q))
    plain = _plan(model)
    ids = _tokens()
    qlora = _apply(graphdef, lora.combine(plan, adapters, frozen), ids)
    reference = _apply(graphdef, lora.combine(plain, adapters, dequantized), ids)
    np.testing.assert_allclose(np.asarray(qlora), np.asarray(reference), rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 lora.base_params(plan, frozen), dequantized)  # the reference policy
    unquantized = _apply(graphdef, lora.combine(plain, adapters, params), ids)
    assert float(jnp.max(jnp.abs(qlora - unquantized))) > 1e-5  # quantization is really on


def test_train_also_trains_a_parameter_in_full(model):
    graphdef, abstract_params, axes, params = model
    plan = _plan(model, targets="attn/q/kernel", train_also="lm_head/kernel")
    trainable = lora.init_adapters(plan, jax.random.key(0), params)
    np.testing.assert_array_equal(np.asarray(trainable["lm_head"]["kernel"]),
                                  np.asarray(params["lm_head"]["kernel"]))
    assert trainable["lm_head"]["kernel"] is not params["lm_head"]["kernel"]  # donation-safe
    changed = {**trainable, "lm_head": {"kernel": trainable["lm_head"]["kernel"] + 1.0}}
    out = lora.combine(plan, changed, params)
    np.testing.assert_array_equal(np.asarray(out["lm_head"]["kernel"]),
                                  np.asarray(params["lm_head"]["kernel"]) + 1.0)
    assert lora.num_trainable(plan, abstract_params) == 2 * 8 * (32 + 32) + 32 * 97
    with pytest.raises(ConfigError, match="train_also='nothing' matches no parameter"):
        _plan(model, train_also="nothing")


@pytest.mark.slow
def test_lora_run_through_the_cli(tiny_data, tmp_path):
    """A LoRA run of pretrain_ntp: the checkpoint holds only the adapters and their optimizer
    state, the manifest names the base, it resumes, and load_run returns base + adapters."""
    run_dir = str(tmp_path / "lora_run")
    lora_args = ["--gin_param=LoraConfig.enabled=True", "--gin_param=LoraConfig.rank=4",
                 "--gin_param=LoraConfig.targets='attn/(q|v)/kernel'"]
    run_experiment("experiments.pretrain_ntp", tiny_run_args(run_dir, tiny_data, *lora_args)
                   + ["--gin_param=TrainConfig.steps=3"])
    proc = run_experiment("experiments.pretrain_ntp", tiny_run_args(run_dir, tiny_data,
                                                                    *lora_args)
                          + ["--gin_param=TrainConfig.steps=6"])
    assert "resumed from step 3" in proc.stdout
    with open(os.path.join(run_dir, "manifest.json")) as f:
        record = json.load(f)["lora"]
    assert record["base_run"] is None and record["base_seed"] == 0
    assert record["targets"] == [f"layer_{i}/attn/{p}/kernel" for i in (0, 1) for p in "qv"]

    # The checkpoint: the adapters (a [64, 4], b [4, heads, head_dim]) and their Adam moments;
    # nothing of the base.
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"),
                                    item_names=("state", "data"))
    raw = manager.restore(6, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    manager.close()
    adapters = raw["params"]
    n_adapter = 2 * (64 * 4 + 4 * 4 * 16 + 64 * 4 + 4 * 2 * 16)
    assert sum(x.size for x in jax.tree.leaves(adapters)) == n_adapter
    moments = [x for x in jax.tree.leaves(raw["opt_state"]) if x.dtype == np.float32]
    assert sum(x.size for x in moments) == 2 * n_adapter

    from llm.runs import load_run

    run = load_run(run_dir)
    key, _ = jax.random.split(jax.random.key(0))  # the base: initialised from seed 0
    _, base = transformer.init(run.cfg, key)
    for i in (0, 1):
        for p in "qv":
            ab = adapters[f"layer_{i}"]["attn"][p]["kernel"]
            w = np.asarray(base[f"layer_{i}"]["attn"][p]["kernel"])
            expect = w + 4.0 * np.einsum("er,rhd->ehd", ab["a"], ab["b"])
            np.testing.assert_allclose(np.asarray(run.params[f"layer_{i}"]["attn"][p]["kernel"]),
                                       expect, rtol=1e-5, atol=1e-6)
            assert np.abs(np.asarray(ab["b"])).max() > 0
    np.testing.assert_array_equal(np.asarray(run.params["embed"]["embedding"]),
                                  np.asarray(base["embed"]["embedding"]))


def test_regex_matching_nothing_through_the_cli(tiny_data, tmp_path):
    proc = run_experiment("experiments.pretrain_ntp", tiny_run_args(
        str(tmp_path / "r"), tiny_data, "--gin_param=LoraConfig.enabled=True",
        "--gin_param=LoraConfig.targets='attn/qkv'"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("pretrain_ntp: error: LoraConfig.targets='attn/qkv' matches no")
    assert "layer_0/attn/k/kernel" in lines[0]


@pytest.mark.slow
def test_qlora_sharded_matches_single_device():
    """QLoRA steps on 8 fake devices (FSDP x TP rules: the adapters shard like their kernels)
    give the single-device losses and adapters within 1e-5."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.lora_sharding_worker", "single",
         "gin_configs/mesh/fsdp_tp.gin"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    single, sharded = out["single"], out["gin_configs/mesh/fsdp_tp.gin"]
    assert sharded["q_a_spec"] == "P('fsdp',)"  # a [embed, r]: embed -> fsdp
    assert sharded["q_b_spec"] == "P(None, 'tensor')"  # b [r, heads, head_dim]
    assert single["losses"][-1] < single["losses"][0]
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5, atol=1e-5)
    for x, y in zip(sharded["adapters"], single["adapters"]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
