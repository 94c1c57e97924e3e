"""RoPE scaling (linear, dynamic NTK, llama3, YaRN) against transformers itself: the frequencies
against transformers' own `ROPE_INIT_FUNCTIONS`, and a randomly initialised LlamaForCausalLM
carrying `rope_scaling` imported, compared (logits past the original context, greedy decoding
across it) and exported back (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from llm.config import ConfigError  # noqa: E402
from llm.interop import hf  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402
from llm.model.layers import rope_frequencies  # noqa: E402
from llm.runs import load_run  # noqa: E402
from llm.serve.sampler import generate  # noqa: E402
from tests.interop.test_hf import VOCAB, _save, spm_model  # noqa: E402,F401

MAX_POS = 64  # max_position_embeddings; llama3/yarn pretrained at ORIGINAL (factor 4 / 2)
ORIGINAL = 32
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    # old-style key "type" (transformers 4.x checkpoints) and the new "rope_type"
    "llama3": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0,
             "original_max_position_embeddings": ORIGINAL},
}


def _llama_config(scaling: dict):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=dict(scaling),
        tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=None,
        architectures=["LlamaForCausalLM"])


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_frequencies_match_transformers(kind):
    config = _llama_config(SCALINGS[kind])
    cfg = hf.model_config_from_hf(config.to_dict())
    assert cfg.rope_scaling == kind
    for seq in (16, MAX_POS, 200):  # below, at and beyond the original context
        positions = np.arange(seq)[None]
        ours, scale = rope_frequencies(cfg, positions)
        theirs, their_scale = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq)
        ours = np.asarray(ours).reshape(-1)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-6, atol=0)
        assert scale == pytest.approx(their_scale, rel=1e-12)
        # scaling really changes the frequencies (dynamic only past the context)
        plain = 10000.0 ** (-np.arange(0, 16, 2) / 16)
        changed = not np.allclose(ours, plain, rtol=1e-4)
        assert changed == (kind != "dynamic" or seq > MAX_POS), (kind, seq)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_import_parity_and_round_trip(kind, spm_model, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config(SCALINGS[kind]))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.eval()
    src = _save(model, spm_model, str(tmp_path / "hf"))
    run_dir = str(tmp_path / "run")
    hf.import_hf(src, run_dir)
    run = load_run(run_dir)
    assert run.cfg.rope_scaling == kind
    gin_text = Path(run_dir, "config.gin").read_text()
    assert f"ModelConfig.rope_scaling = '{kind}'" in gin_text  # the run directory records it

    # Logits at 3x the context (positions up to 3 * MAX_POS), fp32.
    ids = np.random.default_rng(1).integers(3, VOCAB, size=(2, 3 * MAX_POS)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    from llm.model import transformer

    ours = np.asarray(transformer.apply(run.graphdef, run.params, ids))
    assert np.abs(ours).max() > 1.0
    assert np.abs(ours - theirs).max() <= 1e-4
    # Greedy: 32 tokens after a 48-token prompt, crossing max_position_embeddings (64).
    prompt = ids[0, :48]
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt[None].astype(np.int64)), do_sample=False,
                             max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                             pad_token_id=0)
    ours_tokens = generate(run.graphdef, run.params, run.cfg, [prompt.tolist()],
                           max_new_tokens=32, temperature=0.0, eos_id=-1)[0]
    assert ours_tokens == out[0, len(prompt):].tolist()

    # Export: weights bit-exact, rope settings written back, transformers rebuilds the same model.
    out_dir = str(tmp_path / "exported")
    hf.export_run(run_dir, out_dir)
    original = load_file(os.path.join(src, "model.safetensors"))
    exported = load_file(os.path.join(out_dir, "model.safetensors"))
    assert set(exported) == set(original)
    assert all(np.array_equal(exported[k], v) for k, v in original.items())
    config = json.loads(Path(out_dir, "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == kind
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    for key, value in SCALINGS[kind].items():
        if key != "type":
            assert reloaded.config.rope_parameters[key] == value, key
    with torch.no_grad():
        again = reloaded(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.array_equal(again, theirs)


def test_unsupported_rope_scaling_is_one_line():
    config = _llama_config({"rope_type": "linear", "factor": 2.0}).to_dict()
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(ConfigError, match="RoPE scaling type 'longrope' is not supported"):
        hf.model_config_from_hf(config)
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                 "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5"):
        hf.model_config_from_hf(config)
    with pytest.raises(ConfigError, match="rope_original_max_len"):
        ModelConfig(rope_scaling="llama3", rope_factor=8.0)
    with pytest.raises(ConfigError, match="ModelConfig.rope_scaling='ntk'"):
        ModelConfig(rope_scaling="ntk")
