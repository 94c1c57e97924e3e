"""Hugging Face interop: a run directory <-> a `transformers` checkpoint directory.

    export_run("runs/X", "hf/X")          # model.safetensors, config.json, generation_config.json,
                                          # tokenizer.json (+ tokenizer.model, tokenizer_config)
    import_hf("hf/X", "runs/Y")           # manifest.json, config.gin, checkpoints/0 (orbax)

Two architectures, both loadable by `transformers.AutoModelForCausalLM.from_pretrained(dir)`
without custom code:
  LlamaForCausalLM - ModelConfig(norm="rmsnorm", position="rope", activation="swiglu"); GQA,
                     tied or untied embeddings, optional biases (attention_bias / mlp_bias).
  GPT2LMHeadModel  - ModelConfig(norm="layernorm", position="learned", activation="gelu",
                     use_bias=True), MHA only.

Layout notes (what needed care):
  * Our Dense kernels are [in..., out...] (q: [embed, heads, head_dim], o: [heads, head_dim,
    embed]); torch `nn.Linear.weight` is [out, in], so LLaMA projections are transposed and the
    head axes flattened/unflattened. GPT-2's `Conv1D.weight` is already [in, out]: no transpose.
  * GPT-2 fuses q, k and v into one `c_attn` [embed, 3*embed] (q | k | v along the output axis,
    head-major inside each); we keep three projections and split/concatenate.
  * RoPE: our `layers.rope` is the rotate-half form with frequencies theta^(-2i/head_dim), which
    is exactly HF LLaMA's `rotate_half` convention, so q/k need NO permutation here (the
    permutation in HF's convert_llama_weights_to_hf.py maps Meta's interleaved pairs to halves;
    llama.cpp's GGUF wants the interleaved form back).
  * RoPE scaling: `rope_parameters` (transformers >= 5) or the legacy `rope_scaling` with
    "type" or "rope_type" maps to ModelConfig.rope_scaling / rope_factor / rope_* (linear,
    dynamic, llama3, yarn; layers.rope_frequencies has the formulas); llama3/yarn without
    original_max_position_embeddings take max_position_embeddings, as transformers does; YaRN's
    mscale/mscale_all_dim become rope_attention_factor. Export writes rope_parameters and the
    legacy rope_scaling + rope_theta. longrope, partial rotary and per-layer RoPE are errors.
  * LLaMA `gate_proj` is our `mlp.wg` (through SiLU), `up_proj` our `mlp.wi`.
  * GELU: our MLP uses the tanh approximation, which is GPT-2's "gelu_new".
  * A LLaMA checkpoint with attention biases but no MLP biases (or the reverse) imports with
    zero biases where HF has none (`use_bias` covers both); the logits are unchanged.
The tokenizer is exported as a `tokenizers` Unigram model built from the SentencePiece pieces
and scores (byte fallback, the same whitespace pre-splitting as our SentencePiece options), so
`AutoTokenizer.from_pretrained(dir)` gives our ids; the SentencePiece file goes beside it. Ids are
exact by construction for models trained with scores on a 2^-3 grid (`train_sentencepiece`
default, `llm.data.tokenizer.quantize_scores`); older unrounded models can differ in equal-score
ties inside runs of repeated characters (docs/interop.md "Tokenizer").
Import reads a SentencePiece `tokenizer.model` (`seqio_tokenizer`) or, without one, the source's
`tokenizer.json` (GPT-2 / Llama-3-style byte-level BPE; `relabel_tokenizer_json`), relabelled
to pad 0 / eos 1 / unk 2 with the vocabulary rows moved (and pad/unk rows added) to match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import numpy as np

from llm.config import ConfigError
from llm.data.objectives import EOS_ID, PAD_ID, UNK_ID
from llm.data.sources import DataError
from llm.data.tokenizer import is_tokenizer_json
from llm.model.config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "GPT2LMHeadModel")
TOKENIZER_FILE = "tokenizer.model"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files of the source directory an import keeps (run_dir/hf_source/) for the export back.
SOURCE_DIR = "hf_source"
SOURCE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", TOKENIZER_FILE, "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
# The run's tokenizer when the source has only a tokenizer.json (`relabel_tokenizer_json`).
JSON_TOKENIZER_FILE = "tokenizer.json"
# Contents of the pad / unk tokens added when the source has none (GPT-2, Llama-3).
ADDED_PAD, ADDED_UNK = "<llm_pad>", "<llm_unk>"


# ----------------------------------------------------------------------------------------------
# Config <-> config.json
# ----------------------------------------------------------------------------------------------

def architecture(cfg: ModelConfig) -> str:
    """The HF architecture a ModelConfig exports as; ConfigError when it has none."""
    if (cfg.norm, cfg.position, cfg.activation) == ("rmsnorm", "rope", "swiglu"):
        return "LlamaForCausalLM"
    if (cfg.norm, cfg.position, cfg.activation) == ("layernorm", "learned", "gelu"):
        if not cfg.use_bias or cfg.kv_heads != cfg.num_heads or \
                cfg.dim_per_head * cfg.num_heads != cfg.d_model:
            raise ConfigError("a GPT-2-style model exports to GPT2LMHeadModel only with "
                              "use_bias=True, num_kv_heads=num_heads and head_dim=d_model/"
                              f"num_heads (got use_bias={cfg.use_bias}, num_kv_heads="
                              f"{cfg.kv_heads}, head_dim={cfg.dim_per_head}).")
        return "GPT2LMHeadModel"
    raise ConfigError(f"ModelConfig(norm={cfg.norm!r}, position={cfg.position!r}, activation="
                      f"{cfg.activation!r}) has no Hugging Face architecture; export supports "
                      "LLaMA-style (rmsnorm, rope, swiglu) and GPT-2-style (layernorm, learned, "
                      "gelu) decoders.")


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for `cfg` (transformers' own field names)."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "bos_token_id": None,
              "torch_dtype": "float32", "dtype": "float32"}
    if architecture(cfg) == "LlamaForCausalLM":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_dim,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
                "max_position_embeddings": (cfg.rope_original_max_len or cfg.max_seq_len)
                if cfg.rope_scaling == "dynamic" else cfg.max_seq_len,
                "rms_norm_eps": cfg.norm_eps,
                "hidden_act": "silu", "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
                **_rope_config(cfg), **common}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.hidden_dim,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}


# HF rope parameter name -> ModelConfig field, per rope_type (besides rope_theta and factor).
_ROPE_FIELDS = {
    "linear": {},
    "dynamic": {},
    "llama3": {"original_max_position_embeddings": "rope_original_max_len",
               "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor"},
    "yarn": {"original_max_position_embeddings": "rope_original_max_len",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow",
             "attention_factor": "rope_attention_factor", "truncate": "rope_truncate"},
}


def _rope_config(cfg: ModelConfig) -> dict:
    """config.json's RoPE fields: `rope_parameters` (transformers >= 5) and, when scaled, the
    legacy `rope_scaling` + `rope_theta` that transformers 4.x reads."""
    theta = cfg.rope_theta
    if cfg.rope_scaling == "none":
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default",
                                                         "rope_theta": theta}}
    params = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
    for name, field in _ROPE_FIELDS[cfg.rope_scaling].items():
        if getattr(cfg, field) is not None:
            params[name] = getattr(cfg, field)
    return {"rope_theta": theta, "rope_parameters": {**params, "rope_theta": theta},
            "rope_scaling": {**params, "type": cfg.rope_scaling}}


def _rope_settings(config: dict, path: str) -> dict:
    """ModelConfig's rope_* settings from a LLaMA config.json: `rope_parameters`
    (transformers >= 5) or the legacy `rope_scaling` ("type" or "rope_type") + `rope_theta`.
    ConfigError naming a rope type or setting the model does not implement."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"{path}: per-layer-type rope_parameters ({', '.join(rope)}) are not "
                          "supported; LLaMA import needs one RoPE for every layer.")
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    if kind == "default":
        return {"rope_theta": theta}
    if kind not in _ROPE_FIELDS:
        raise ConfigError(f"{path}: RoPE scaling type {kind!r} is not supported; import supports "
                          f"{', '.join(_ROPE_FIELDS)} (ModelConfig.rope_scaling).")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{path}: partial_rotary_factor={partial} is not supported (RoPE "
                          "rotates the whole head here).")
    out = {"rope_theta": theta, "rope_scaling": kind}
    max_len = config.get("max_position_embeddings")
    if kind in ("llama3", "yarn"):  # transformers' defaults for a missing original length
        original = config.get("original_max_position_embeddings") or \
            rope.get("original_max_position_embeddings") or max_len
        rope = {**rope, "original_max_position_embeddings": original}
    factor = rope.get("factor")
    if factor is None and kind == "yarn" and max_len:
        factor = max_len / rope["original_max_position_embeddings"]
    if factor is None:
        raise ConfigError(f"{path}: rope_scaling of type {kind!r} has no 'factor'; add it.")
    out["rope_factor"] = float(factor)
    for name, field in _ROPE_FIELDS[kind].items():
        if rope.get(name) is not None:
            value = rope[name]
            out[field] = (int(value) if field == "rope_original_max_len" else
                          bool(value) if field == "rope_truncate" else float(value))
    if kind == "yarn" and rope.get("attention_factor") is None and \
            rope.get("mscale") and rope.get("mscale_all_dim"):
        def mscale(scale: float, m: float) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        out["rope_attention_factor"] = (mscale(factor, rope["mscale"]) /
                                        mscale(factor, rope["mscale_all_dim"]))
    if kind == "dynamic" and max_len:
        out["rope_original_max_len"] = int(max_len)
    return out


def _field(config: dict, name: str, path: str):
    if name not in config or config[name] is None:
        raise ConfigError(f"{path} has no {name!r} field, which import needs; add it (see the "
                          "transformers config class of this architecture).")
    return config[name]


def model_config_from_hf(config: dict, path: str = "config.json") -> ModelConfig:
    """The ModelConfig of a HF config.json dict; ConfigError for what we cannot represent."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: architecture {arch!r} is not supported; import supports "
                          f"{', '.join(ARCHITECTURES)}.")
    vocab = int(_field(config, "vocab_size", path))
    tie = bool(config.get("tie_word_embeddings", True))
    if arch == "LlamaForCausalLM":
        rope_settings = _rope_settings(config, path)
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{path}: hidden_act={config['hidden_act']!r} is not supported "
                              "for LLaMA (only 'silu').")
        heads = int(_field(config, "num_attention_heads", path))
        d = int(_field(config, "hidden_size", path))
        return ModelConfig(
            vocab_size=vocab, d_model=d, num_layers=int(_field(config, "num_hidden_layers", path)),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or d // heads),
            mlp_dim=int(_field(config, "intermediate_size", path)),
            max_seq_len=int(config.get("max_position_embeddings", 2048)), norm="rmsnorm",
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), position="rope",
            activation="swiglu", **rope_settings,
            use_bias=bool(config.get("attention_bias") or config.get("mlp_bias")),
            tie_embeddings=tie)
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{path}: activation_function={act!r} is not supported for GPT-2 "
                          "(only the tanh GELU, 'gelu_new').")
    if not config.get("scale_attn_weights", True) or \
            config.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(f"{path}: scale_attn_weights=False / scale_attn_by_inverse_layer_idx="
                          "True are not supported (attention is scaled by 1/sqrt(head_dim)).")
    d = int(_field(config, "n_embd", path))
    return ModelConfig(
        vocab_size=vocab, d_model=d, num_layers=int(_field(config, "n_layer", path)),
        num_heads=int(_field(config, "n_head", path)), mlp_dim=int(config.get("n_inner") or 4 * d),
        max_seq_len=int(_field(config, "n_positions", path)), norm="layernorm",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)), position="learned",
        activation="gelu", use_bias=True, tie_embeddings=tie)


# ----------------------------------------------------------------------------------------------
# Weights: our nested params dict <-> HF state dict (numpy, fp32)
# ----------------------------------------------------------------------------------------------

def to_hf_state(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF tensors (name -> array) of our params. Shapes in the docstring at the top."""
    p = _numpy(params)
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    out: dict[str, np.ndarray] = {}
    if architecture(cfg) == "LlamaForCausalLM":
        out["model.embed_tokens.weight"] = p["embed"]["embedding"]
        for i in range(cfg.num_layers):
            layer, pre = p[f"layer_{i}"], f"model.layers.{i}."
            out[pre + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
            out[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
            for name, n in (("q", h), ("k", kv), ("v", kv)):
                out[pre + f"self_attn.{name}_proj.weight"] = \
                    layer["attn"][name]["kernel"].reshape(d, n * hd).T
                if cfg.use_bias:
                    out[pre + f"self_attn.{name}_proj.bias"] = layer["attn"][name]["bias"].ravel()
            out[pre + "self_attn.o_proj.weight"] = layer["attn"]["o"]["kernel"].reshape(h * hd, d).T
            for name, ours in (("gate", "wg"), ("up", "wi"), ("down", "wo")):
                out[pre + f"mlp.{name}_proj.weight"] = layer["mlp"][ours]["kernel"].T
                if cfg.use_bias:
                    out[pre + f"mlp.{name}_proj.bias"] = layer["mlp"][ours]["bias"]
            if cfg.use_bias:
                out[pre + "self_attn.o_proj.bias"] = layer["attn"]["o"]["bias"]
        out["model.norm.weight"] = p["final_norm"]["scale"]
    else:
        out["transformer.wte.weight"] = p["embed"]["embedding"]
        out["transformer.wpe.weight"] = p["pos_embed"]["embedding"]
        for i in range(cfg.num_layers):
            layer, pre = p[f"layer_{i}"], f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[pre + f"{theirs}.weight"] = layer[ours]["scale"]
                out[pre + f"{theirs}.bias"] = layer[ours]["bias"]
            a = layer["attn"]
            out[pre + "attn.c_attn.weight"] = np.concatenate(
                [a[n]["kernel"].reshape(d, d) for n in "qkv"], axis=1)
            out[pre + "attn.c_attn.bias"] = np.concatenate([a[n]["bias"].ravel() for n in "qkv"])
            out[pre + "attn.c_proj.weight"] = a["o"]["kernel"].reshape(d, d)
            out[pre + "attn.c_proj.bias"] = a["o"]["bias"]
            out[pre + "mlp.c_fc.weight"] = layer["mlp"]["wi"]["kernel"]
            out[pre + "mlp.c_fc.bias"] = layer["mlp"]["wi"]["bias"]
            out[pre + "mlp.c_proj.weight"] = layer["mlp"]["wo"]["kernel"]
            out[pre + "mlp.c_proj.bias"] = layer["mlp"]["wo"]["bias"]
        out["transformer.ln_f.weight"] = p["final_norm"]["scale"]
        out["transformer.ln_f.bias"] = p["final_norm"]["bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_state(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Our params dict from HF tensors; DataError naming the tensor on a missing name or a shape
    that does not match config.json."""
    from llm.model import transformer

    _, abstract, _ = transformer.abstract(cfg)
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head

    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...], zeros_if_missing: bool = False) -> np.ndarray:
        used.add(name)
        if name not in tensors:
            if zeros_if_missing:
                return np.zeros(shape, np.float32)
            raise DataError(f"tensor {name!r} is missing from the checkpoint (config.json "
                            "describes a model that has it).")
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise DataError(f"tensor {name!r} has shape {tuple(t.shape)}, but config.json implies "
                            f"{tuple(shape)}; the weights and config.json disagree.")
        return np.asarray(t, np.float32)

    f = cfg.hidden_dim
    p: dict = {}
    if architecture(cfg) == "LlamaForCausalLM":
        p["embed"] = {"embedding": get("model.embed_tokens.weight", (cfg.vocab_size, d))}
        for i in range(cfg.num_layers):
            pre = f"model.layers.{i}."
            attn = {}
            for name, n in (("q", h), ("k", kv), ("v", kv)):
                w = get(pre + f"self_attn.{name}_proj.weight", (n * hd, d))
                attn[name] = {"kernel": w.T.reshape(d, n, hd)}
                if cfg.use_bias:
                    attn[name]["bias"] = get(pre + f"self_attn.{name}_proj.bias", (n * hd,),
                                             True).reshape(n, hd)
            attn["o"] = {"kernel": get(pre + "self_attn.o_proj.weight", (d, h * hd)).T
                         .reshape(h, hd, d)}
            if cfg.use_bias:
                attn["o"]["bias"] = get(pre + "self_attn.o_proj.bias", (d,), True)
            mlp = {}
            for name, ours, shape in (("gate", "wg", (f, d)), ("up", "wi", (f, d)),
                                      ("down", "wo", (d, f))):
                mlp[ours] = {"kernel": get(pre + f"mlp.{name}_proj.weight", shape).T}
                if cfg.use_bias:
                    mlp[ours]["bias"] = get(pre + f"mlp.{name}_proj.bias", (shape[0],), True)
            p[f"layer_{i}"] = {
                "attn_norm": {"scale": get(pre + "input_layernorm.weight", (d,))},
                "mlp_norm": {"scale": get(pre + "post_attention_layernorm.weight", (d,))},
                "attn": attn, "mlp": mlp}
        p["final_norm"] = {"scale": get("model.norm.weight", (d,))}
    else:
        p["embed"] = {"embedding": get("transformer.wte.weight", (cfg.vocab_size, d))}
        p["pos_embed"] = {"embedding": get("transformer.wpe.weight", (cfg.max_seq_len, d))}
        for i in range(cfg.num_layers):
            pre = f"transformer.h.{i}."
            qkv = get(pre + "attn.c_attn.weight", (d, 3 * d))
            qkv_b = get(pre + "attn.c_attn.bias", (3 * d,))
            attn = {n: {"kernel": qkv[:, j * d:(j + 1) * d].reshape(d, h, hd),
                        "bias": qkv_b[j * d:(j + 1) * d].reshape(h, hd)}
                    for j, n in enumerate("qkv")}
            attn["o"] = {"kernel": get(pre + "attn.c_proj.weight", (d, d)).reshape(h, hd, d),
                         "bias": get(pre + "attn.c_proj.bias", (d,))}
            p[f"layer_{i}"] = {
                "attn_norm": {"scale": get(pre + "ln_1.weight", (d,)),
                              "bias": get(pre + "ln_1.bias", (d,))},
                "mlp_norm": {"scale": get(pre + "ln_2.weight", (d,)),
                             "bias": get(pre + "ln_2.bias", (d,))},
                "attn": attn,
                "mlp": {"wi": {"kernel": get(pre + "mlp.c_fc.weight", (d, f)),
                               "bias": get(pre + "mlp.c_fc.bias", (f,))},
                        "wo": {"kernel": get(pre + "mlp.c_proj.weight", (f, d)),
                               "bias": get(pre + "mlp.c_proj.bias", (d,))}}}
        p["final_norm"] = {"scale": get("transformer.ln_f.weight", (d,)),
                           "bias": get("transformer.ln_f.bias", (d,))}
    if not cfg.tie_embeddings:
        p["lm_head"] = {"kernel": get("lm_head.weight", (cfg.vocab_size, d)).T}
    # Buffers transformers may save that carry no weights; anything else left over is a part of
    # the model this mapping would silently drop (e.g. q/k norms), so it is an error.
    ignorable = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
    extra = sorted(n for n in tensors if n not in used and not n.endswith(ignorable)
                   and not (n == "lm_head.weight" and cfg.tie_embeddings and np.array_equal(
                       tensors[n], p["embed"]["embedding"])))
    if extra:
        raise DataError(f"the checkpoint has {len(extra)} tensor(s) this architecture does not "
                        f"use, e.g. {extra[0]!r}; config.json and the weights disagree (or the "
                        "model has parts import does not map).")
    p = {k: _contiguous(v) for k, v in p.items()}
    import jax

    expected = jax.tree.map(lambda a: a.shape, abstract)
    got = jax.tree.map(lambda a: a.shape, p)
    if expected != got:  # a bug in this mapping, not in the user's input
        raise AssertionError(f"import built params {got}, the model expects {expected}")
    return p


def _numpy(tree):
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def seqio_tokenizer(spm_path: str) -> tuple[bytes, list[int] | None]:
    """A SentencePiece model with this repo's special ids (pad/BOS 0, eos 1, unk 2), from any
    SentencePiece `tokenizer.model`: (serialized model, permutation or None when the ids already
    match). permutation[new_id] = old_id: the piece that becomes pad/BOS (the model's pad, else
    its BOS), then eos, then unk, then every other piece in its old order. A LLaMA/Mistral hub
    tokenizer (unk 0, <s> 1, </s> 2) becomes <s> 0, </s> 1, <unk> 2 -- our BOS is id 0, so a
    prompt starts with <s> as LLaMA's does -- and every other id is unchanged.
    DataError when the model has no eos, no unk, or neither pad nor BOS."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(spm_path, "rb") as f:
        data = f.read()
    try:
        proto = pb.ModelProto.FromString(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # protobuf DecodeError or sentencepiece RuntimeError
        raise DataError(f"{spm_path} is not a SentencePiece model ({type(e).__name__}).") from None
    pad, bos, eos, unk = sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()
    if (pad, eos, unk) == (PAD_ID, EOS_ID, UNK_ID):
        return data, None
    start = pad if pad >= 0 else bos
    if min(start, eos, unk) < 0:
        raise DataError(f"{spm_path} has pad/bos/eos/unk ids {pad}/{bos}/{eos}/{unk}; import "
                        "needs an eos, an unk and a pad or BOS piece (ours: pad/BOS 0, eos 1, "
                        "unk 2).")
    front = [start, eos, unk]
    perm = front + [i for i in range(len(proto.pieces)) if i not in front]
    pieces = [pb.ModelProto.SentencePiece.FromString(proto.pieces[i].SerializeToString())
              for i in perm]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    spec = proto.trainer_spec
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = PAD_ID, EOS_ID, UNK_ID, -1
    spec.pad_piece, spec.eos_piece, spec.unk_piece = (pieces[i].piece for i in range(3))
    return proto.SerializeToString(), perm


def _permute_vocab(cfg: ModelConfig, params: dict, perm: list[int]) -> dict:
    """params with the vocabulary rows (embedding; untied lm_head columns) reordered so that
    new row i is old row perm[i]; rows past the tokenizer (a padded vocabulary) stay put."""
    order = np.asarray(list(perm) + list(range(len(perm), cfg.vocab_size)))
    out = dict(params)
    out["embed"] = {"embedding": params["embed"]["embedding"][order]}
    if "lm_head" in params:
        out["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, order]}
    return out


def _token_content(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def relabel_tokenizer_json(hf_dir: str, config: dict, model_rows: int
                           ) -> tuple[dict, list[int], int]:
    """A source tokenizer.json (byte-level BPE as GPT-2's / Llama-3's, or WordPiece/WordLevel)
    relabelled to this repo's special ids: (tokenizer.json dict, permutation, rows added).

    pad=0: the source's pad token (tokenizer_config.json), else a new special `<llm_pad>`;
    eos=1: the source's eos_token (tokenizer_config.json, else config.json eos_token_id);
    unk=2: the source's unk token when it is neither eos nor pad, else a new `<llm_unk>` (GPT-2's
    unk is its eos). New tokens take source ids model_rows, model_rows+1 (rows appended to the
    model); permutation[new_id] = source id (over model_rows + added ids): pad, eos, unk, then
    every other id in its order, so the other tokens keep their order, shifted by at most 3.
    Every id in the JSON (model vocab, added_tokens, post-processor specials) is remapped; merges,
    normalizer, pre-tokenizer and decoder are strings and stay, so encode gives the source's
    tokens. DataError for a model type or post-processor we cannot relabel, or no eos."""
    from tokenizers import Tokenizer as HFTok

    path = os.path.join(hf_dir, "tokenizer.json")
    try:
        with open(path) as f:
            tj = json.load(f)
        source = HFTok.from_file(path)
    except Exception as e:  # JSONDecodeError or tokenizers' own
        raise DataError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}).") from None
    kind = (tj.get("model") or {}).get("type")
    if kind not in ("BPE", "WordPiece", "WordLevel"):
        raise DataError(f"{path}: tokenizer model type {kind!r} without a SentencePiece "
                        f"{TOKENIZER_FILE} is not supported; import reads BPE (byte-level or "
                        "not), WordPiece and WordLevel tokenizer.json files, or pass "
                        "--tokenizer=PATH to a SentencePiece model whose ids match the rows.")
    tconf = {}
    if os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
        with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
            tconf = json.load(f)
    size = source.get_vocab_size(with_added_tokens=True)
    top = max(source.get_vocab(with_added_tokens=True).values())
    if top >= model_rows:
        raise DataError(f"{path} has token id {top}, but config.json vocab_size={model_rows}; "
                        "the tokenizer and the weights disagree.")

    def source_id(name: str) -> int | None:
        content = _token_content(tconf.get(name))
        return None if content is None else source.token_to_id(content)

    eos = source_id("eos_token")
    if eos is None and isinstance(config.get("eos_token_id"), int):
        eos = config["eos_token_id"]
    if eos is None:
        raise DataError(f"{hf_dir}: no eos token (tokenizer_config.json eos_token or config.json "
                        "eos_token_id); add one.")
    bos, pad, unk = source_id("bos_token"), source_id("pad_token"), source_id("unk_token")
    if bos is None and isinstance(config.get("bos_token_id"), int):
        bos = config["bos_token_id"]
    # Id 0 is what this repo's model reads at position 0 (shift_right's BOS, the evaluator's
    # and the engine's BOS_ID) and what losses mask as padding: the source's BOS when it has
    # one of its own (Llama-3's <|begin_of_text|>), else its pad, else a new row.
    start = bos if bos not in (None, eos) else pad if pad not in (None, eos) else None
    unk = unk if unk not in (None, eos, start) else None
    added: list[str] = []
    front = []
    for sid, content in ((start, ADDED_PAD), (eos, None), (unk, ADDED_UNK)):
        if sid is None:
            while source.token_to_id(content) is not None:
                content = content[:-1] + "_>"
            sid = model_rows + len(added)
            added.append(content)
        front.append(sid)
    perm = front + [i for i in range(model_rows + len(added)) if i not in front]
    new_of = np.argsort(perm)

    model = tj["model"]
    vocab = {k: int(new_of[v]) for k, v in model["vocab"].items()}
    for content, sid in zip(added, range(model_rows, model_rows + len(added))):
        vocab[content] = int(new_of[sid])
    model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    tokens = [{**t, "id": int(new_of[t["id"]])} for t in tj.get("added_tokens") or []]
    for content, sid in zip(added, range(model_rows, model_rows + len(added))):
        tokens.append({"id": int(new_of[sid]), "content": content, "single_word": False,
                       "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    by_id = {t["id"]: t for t in tokens}
    for i in (PAD_ID, EOS_ID, UNK_ID):  # our specials are special tokens, whatever the source
        if i in by_id:
            by_id[i]["special"] = True
        else:
            content = next(k for k, v in vocab.items() if v == i)
            by_id[i] = {"id": i, "content": content, "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": True}
    tj["added_tokens"] = sorted(by_id.values(), key=lambda t: t["id"])

    def remap(proc):
        if proc is None:
            return None
        kind = proc.get("type")
        if kind == "Sequence":
            return {**proc, "processors": [remap(p) for p in proc["processors"]]}
        if kind == "TemplateProcessing":
            specials = {name: {**t, "ids": [int(new_of[i]) for i in t["ids"]]}
                        for name, t in proc.get("special_tokens", {}).items()}
            # A BOS the template adds is now id 0, which every consumer here puts in front
            # itself (BOS_ID): drop it from the templates so it is not read twice.
            bos_names = {n for n, t in specials.items() if t["ids"] == [PAD_ID]}

            def keep(piece) -> bool:
                return (piece.get("SpecialToken") or {}).get("id") not in bos_names

            return {**proc, "special_tokens": {n: t for n, t in specials.items()
                                               if n not in bos_names},
                    "single": [x for x in proc["single"] if keep(x)],
                    "pair": [x for x in proc["pair"] if keep(x)]}
        if kind in ("RobertaProcessing", "BertProcessing"):
            return {**proc, "sep": [proc["sep"][0], int(new_of[proc["sep"][1]])],
                    "cls": [proc["cls"][0], int(new_of[proc["cls"][1]])]}
        if kind == "ByteLevel":
            return proc
        raise DataError(f"{path}: post_processor type {kind!r} is not supported (import "
                        "relabels TemplateProcessing, Roberta/BertProcessing, ByteLevel and "
                        "Sequence).")

    tj["post_processor"] = remap(tj.get("post_processor"))
    # Added tokens outside the model's vocabulary (Llama-3's <|begin_of_text|> and reserved
    # tokens) go into it too, at their ids: `tokenizers` re-assigns an added token that the
    # model does not know the next free id on load, which after relabelling is not its own.
    for t in tj["added_tokens"]:
        vocab.setdefault(t["content"], t["id"])
    model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    want = {k: int(new_of[v]) for k, v in source.get_vocab(with_added_tokens=True).items()}
    want.update({c: int(new_of[model_rows + i]) for i, c in enumerate(added)})
    got = HFTok.from_str(json.dumps(tj)).get_vocab(with_added_tokens=True)
    if got != want or len(want) != size + len(added):
        wrong = sorted(k for k in want if got.get(k) != want[k])[:3]
        raise DataError(f"{path}: the relabelled tokenizer does not load with the relabelled ids "
                        f"(e.g. {wrong}); this tokenizer.json layout is not supported by import.")
    return tj, [int(i) for i in perm], len(added)


def _grow_and_permute_vocab(cfg: ModelConfig, params: dict, perm: list[int],
                            added: int) -> dict:
    """params with `added` vocabulary rows appended (each the mean of the existing rows, in the
    embedding and in an untied head's columns), then reordered: new row i is old row perm[i]."""
    out = dict(params)
    emb = params["embed"]["embedding"]
    out["embed"] = {"embedding": np.concatenate(
        [emb, np.repeat(emb.mean(0, keepdims=True), added, 0)])}
    if "lm_head" in params:
        head = params["lm_head"]["kernel"]
        out["lm_head"] = {"kernel": np.concatenate(
            [head, np.repeat(head.mean(1, keepdims=True), added, 1)], axis=1)}
    return _permute_vocab(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + added), out, perm)


def hf_tokenizer(spm_model_path: str):
    """A `transformers` fast tokenizer with our SentencePiece model's ids: a Unigram model over
    the same pieces and scores, byte fallback, spaces -> '▁', and words split as SentencePiece
    splits them with split_by_whitespace + allow_whitespace_only_pieces (a run of '▁' starts a
    word). No BOS, no EOS added (as `Tokenizer.encode`)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with open(spm_model_path, "rb") as f:
        proto = pb.ModelProto.FromString(f.read())
    if proto.trainer_spec.model_type != pb.TrainerSpec.UNIGRAM:
        raise ConfigError(f"tokenizer {spm_model_path!r} is not a unigram SentencePiece model; "
                          "export supports unigram models (prepare.* default).")
    # Byte and control pieces are not in SentencePiece's trie, so text that spells one
    # ("<0x41>", "</s>") is encoded as ordinary text; in a tokenizers Unigram every vocabulary
    # entry is matchable, and at score 0 the spelling would win. A score no segmentation of
    # those few characters can fall to keeps them unmatched; it also lowers tokenizers'
    # unknown-piece score (min score - 10), but an unknown character has no other piece
    # covering it, so that score is added to every competing path alike and changes no choice.
    never = -(2.0**14)
    vocab = [(piece.piece, piece.score if piece.type in (pb.ModelProto.SentencePiece.NORMAL,
                                                         pb.ModelProto.SentencePiece.USER_DEFINED)
              else never) for piece in proto.pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=proto.pieces[EOS_ID].piece,
                                   pad_token=proto.pieces[PAD_ID].piece,
                                   unk_token=proto.pieces[UNK_ID].piece, split_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# Export / import of whole directories
# ----------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")


def export_run(run_dir: str, out_dir: str, step: int | None = None, dtype: str = "auto",
               max_shard_bytes: int | None = None) -> str:
    """Write `run_dir`'s checkpoint (`step`, default the newest) as a HF model directory.

    dtype: float32 | bfloat16 | float16 | auto (the dtype of the checkpoint an imported run came
    from, else float32). max_shard_bytes: split the weights into `model-0000i-of-0000n.
    safetensors` shards of at most this many bytes (one tensor per shard at least) plus
    `model.safetensors.index.json`, as `save_pretrained(max_shard_size=...)` does; None: one
    `model.safetensors`. A run written by `import_hf` gets its source back: the vocabulary
    order of a hub tokenizer (see `seqio_tokenizer`) is undone and the source's own tokenizer
    files and generation_config.json are written, so import -> export is bit-exact."""
    from safetensors.numpy import save_file

    from llm.runs import load_run

    run = load_run(run_dir, step=step)
    source = run.manifest.get("imported_from") or {}
    if dtype == "auto":
        dtype = source.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not one of 'auto', {', '.join(map(repr, DTYPES))}"
                          ".")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConfigError(f"--max_shard_bytes={max_shard_bytes} must be a positive byte count.")
    config = hf_config(run.cfg)
    tensors = to_hf_state(run.cfg, run.params)
    source_config = source.get("config") or {}
    if architecture(run.cfg) == "LlamaForCausalLM" and run.cfg.use_bias:
        # `use_bias` covers attention and MLP; a source with only one of them got zero biases
        # for the other on import: leave them out again while they are still zero.
        for flag, part in (("attention_bias", ".self_attn."), ("mlp_bias", ".mlp.")):
            names = [n for n in tensors if part in n and n.endswith(".bias")]
            if source_config.get(flag) is False and not any(tensors[n].any() for n in names):
                for n in names:
                    del tensors[n]
                config[flag] = False
    perm = source.get("token_permutation")
    if perm:  # back to the source tokenizer's ids: HF row perm[i] is our row i
        order = np.asarray(list(perm) + list(range(len(perm), run.cfg.vocab_size)))
        # Rows added on import (pad/unk a tokenizer.json source lacked) are dropped again.
        rows_kept = run.cfg.vocab_size - int(source.get("added_vocab_rows") or 0)
        for name in ("model.embed_tokens.weight", "transformer.wte.weight", "lm_head.weight"):
            if name in tensors:
                rows = np.empty_like(tensors[name])
                rows[order] = tensors[name]
                tensors[name] = rows[:rows_kept]
        config["vocab_size"] = rows_kept
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config[key] = source_config.get(key)
    if dtype != "float32":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
        tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
        config["torch_dtype"] = config["dtype"] = dtype
    os.makedirs(out_dir, exist_ok=True)
    _save_safetensors(tensors, out_dir, max_shard_bytes, save_file)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    source_dir = os.path.join(run.run_dir, SOURCE_DIR)
    kept = [n for n in SOURCE_FILES if os.path.isfile(os.path.join(source_dir, n))]
    if "generation_config.json" not in kept:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "bos_token_id": None,
                       "do_sample": False, "max_length": run.seq_len}, f, indent=2)
    if perm or "tokenizer.json" in kept:  # the source's own tokenizer, in its own ids
        for name in kept:
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
    elif is_tokenizer_json(run.tokenizer.model_path):
        # A run fine-tuned from a tokenizer.json import (e.g. SFT, chat tags added): its own
        # tokenizer.json, in our ids (BOS id 0 is not added by it: we prepend it ourselves).
        from transformers import PreTrainedTokenizerFast

        tok = run.tokenizer
        PreTrainedTokenizerFast(tokenizer_file=tok.model_path, pad_token=tok.id_to_piece(PAD_ID),
                                eos_token=tok.id_to_piece(EOS_ID),
                                unk_token=tok.id_to_piece(UNK_ID)).save_pretrained(out_dir)
    else:
        hf_tokenizer(run.tokenizer.model_path).save_pretrained(out_dir)
        shutil.copyfile(run.tokenizer.model_path, os.path.join(out_dir, TOKENIZER_FILE))
        if "generation_config.json" in kept:
            shutil.copyfile(os.path.join(source_dir, "generation_config.json"),
                            os.path.join(out_dir, "generation_config.json"))
    return out_dir


def _save_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int | None,
                      save_file) -> None:
    """model.safetensors, or shards of <= max_shard_bytes + model.safetensors.index.json."""
    for name in os.listdir(out_dir):  # a re-export must not leave stale shards beside the new
        if name.endswith(".safetensors") or name == SAFETENSORS_INDEX:
            os.remove(os.path.join(out_dir, name))
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump(index, f, indent=2)


def read_hf_dir(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors) of a HF directory: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists (as `save_pretrained` writes models over
    `max_shard_size`), in any float dtype (fp32, fp16, bf16 -- kept as stored)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 shards load)
    from safetensors.numpy import load_file

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise DataError(f"--hf_dir {hf_dir!r} has no config.json; pass a directory written by "
                        "`save_pretrained` (config.json + *.safetensors).")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{config_path} is not valid JSON ({e}).") from None
    index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
    weight_map: dict[str, str] = {}
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{index_path} is not a safetensors index (no valid 'weight_map': "
                            f"{type(e).__name__}); re-save the model with `save_pretrained`."
                            ) from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not files:
        raise DataError(f"--hf_dir {hf_dir!r} has no *.safetensors file (pytorch_model.bin is "
                        "not read: it is a pickle); re-save with safe_serialization=True.")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"{index_path} lists shard {name!r}, which is not in --hf_dir "
                            f"{hf_dir!r}; copy every shard the index names.")
        tensors.update(load_file(path))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise DataError(f"tensor {absent[0]!r} is listed in {index_path} (shard "
                        f"{weight_map[absent[0]]!r}) but that shard does not hold it; the index "
                        "and the shards are from different saves.")
    return config, tensors


def _tokenizer_path(hf_dir: str, tokenizer: str | None = None) -> str | None:
    """The SentencePiece model to import: `tokenizer` when given, else the HF directory's; None
    when the directory has only a tokenizer.json (`relabel_tokenizer_json`); DataError when it
    has neither, naming the fix."""
    if tokenizer is not None:
        if not os.path.isfile(tokenizer):
            raise DataError(f"--tokenizer={tokenizer!r} is not a file; pass a SentencePiece "
                            "model (e.g. a run's or a data directory's tokenizer.model).")
        return tokenizer
    spm_path = os.path.join(hf_dir, TOKENIZER_FILE)
    if os.path.isfile(spm_path):
        return spm_path
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return None
    raise DataError(f"--hf_dir {hf_dir!r} has neither a tokenizer.json nor a {TOKENIZER_FILE} "
                    "(SentencePiece); copy the model's tokenizer files beside it, or pass "
                    "--tokenizer=PATH to a SentencePiece model whose ids match the embedding "
                    "rows.")


def import_hf(hf_dir: str, run_dir: str, seq_len: int | None = None,
              tokenizer: str | None = None) -> str:
    """Write a run directory (manifest.json, config.gin, tokenizer, checkpoints/0, hf_source/)
    from a HF directory, loadable by `llm.runs.load_run` and so by every stage (fine-tune, eval,
    serve).

    The weights may be one file or index-listed shards, fp32/fp16/bf16 (held as fp32; the
    source dtype is recorded for the export back). Without a `tokenizer.model`, the
    directory's `tokenizer.json` is relabelled (`relabel_tokenizer_json`; rows added for a
    missing pad/unk, recorded as added_vocab_rows) and kept as the run's tokenizer.json
    (`llm.data.tokenizer.HFTokenizer`). Otherwise the tokenizer is the directory's
    SentencePiece `tokenizer.model`: this repo's (pad 0, eos 1, unk 2) as is, or any other, e.g.
    LLaMA's (unk 0, <s> 1, </s> 2), with its special pieces moved to our ids and the embedding
    (and untied head) rows moved with them (`seqio_tokenizer`; the permutation is recorded, the
    logits are the same up to that relabelling). The vocabulary may be smaller than vocab_size
    (padded). `tokenizer`: a SentencePiece model to use instead (for a directory without one,
    e.g. weights saved alone; its ids must match the embedding rows). The source's
    generation_config.json and tokenizer files are kept in hf_source/."""
    import jax
    import orbax.checkpoint as ocp
    import sentencepiece as spm

    from llm.data.tokenizer import load_tokenizer
    from llm.train.manifest import git_commit, package_versions

    config, tensors = read_hf_dir(hf_dir)
    cfg = model_config_from_hf(config, os.path.join(hf_dir, "config.json"))
    params = from_hf_state(cfg, tensors)
    dtypes = {str(t.dtype) for t in tensors.values()}  # mixed or not a float: export fp32
    dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= set(DTYPES) else "float32"
    spm_path = _tokenizer_path(hf_dir, tokenizer)
    added = 0
    if spm_path is None:  # tokenizer.json only (GPT-2, Llama-3, ...): relabel it
        tok_json, perm, added = relabel_tokenizer_json(hf_dir, config, cfg.vocab_size)
        params = _grow_and_permute_vocab(cfg, params, perm, added)
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + added)
        tok_file, tok_bytes = JSON_TOKENIZER_FILE, json.dumps(tok_json, ensure_ascii=False,
                                                              indent=1).encode()
    else:
        tok_bytes, perm = seqio_tokenizer(spm_path)
        pieces = spm.SentencePieceProcessor(model_proto=tok_bytes).get_piece_size()
        if pieces > cfg.vocab_size:
            raise DataError(f"{spm_path} has {pieces} pieces, more than config.json "
                            f"vocab_size={cfg.vocab_size}.")
        if perm:
            params = _permute_vocab(cfg, params, perm)
        tok_file = TOKENIZER_FILE
    if os.path.exists(os.path.join(run_dir, "checkpoints")):
        raise DataError(f"--run_dir {run_dir!r} already holds checkpoints; pick a new run "
                        "directory.")
    os.makedirs(os.path.join(run_dir, SOURCE_DIR), exist_ok=True)
    with open(os.path.join(run_dir, tok_file), "wb") as f:
        f.write(tok_bytes)
    load_tokenizer(os.path.join(run_dir, tok_file))  # DataError if still not seqio ids
    generation_config = None
    for name in SOURCE_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(run_dir, SOURCE_DIR, name))
    if os.path.isfile(os.path.join(hf_dir, "generation_config.json")):
        with open(os.path.join(hf_dir, "generation_config.json")) as f:
            generation_config = json.load(f)
    seq_len = seq_len or min(cfg.max_seq_len, 2048)
    defaults = ModelConfig()
    lines = [f"# Imported from {os.path.abspath(hf_dir)} ({config['architectures'][0]})."]
    for field in sorted(f.name for f in dataclasses.fields(ModelConfig)):
        value = getattr(cfg, field)
        if field != "vocab_size" and value != getattr(defaults, field):
            lines.append(f"ModelConfig.{field} = {value!r}")
    lines.append(f"TrainConfig.seq_len = {seq_len}")
    gin_text = "\n".join(lines) + "\n"
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
        f.write(gin_text)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": ["import_hf", os.path.abspath(hf_dir)], "gin_config": gin_text,
        "git": git_commit(repo), "packages": package_versions(), "objective": "next_token",
        "imported_from": {"hf_dir": os.path.abspath(hf_dir), "config": config,
                          "dtype": dtype,
                          "generation_config": generation_config,
                          "token_permutation": perm, "added_vocab_rows": added},
        "seed": 0,
        "data": {"vocab_size": cfg.vocab_size, "tokenizer": tok_file,
                 "data_dir": os.path.abspath(run_dir)},
    }
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    state = {"step": np.zeros((), np.int32), "params": jax.tree.map(jax.numpy.asarray, params)}
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")),
                                    item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return run_dir


def compare(run_dir: str, hf_dir: str, *, seq: int = 32, new_tokens: int = 32,
            seed: int = 0) -> dict:
    """Check a run against a HF directory with transformers itself (both fp32 on CPU):
    max |logit difference| on random ids [2, seq], whether 32 greedy tokens agree, and the
    batch-1 greedy decode speed of both (our `sampler.generate`, jitted and warmed up; HF
    `generate`, KV cache on), timed interleaved, best of 3."""
    import torch
    import transformers

    from llm.model import transformer
    from llm.runs import load_run
    from llm.serve.sampler import generate

    run = load_run(run_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir,
                                                              dtype=torch.float32).eval()
    # A run imported with a relabelled tokenizer: HF id order[i] is our id i.
    source = run.manifest.get("imported_from") or {}
    perm = source.get("token_permutation") or []
    order = np.asarray(list(perm) + list(range(len(perm), run.cfg.vocab_size)))
    # Our ids of the source's rows (rows added on import, pad/unk, have no HF logit).
    real = np.argsort(order)[:run.cfg.vocab_size - int(source.get("added_vocab_rows") or 0)]
    ids = real[np.random.default_rng(seed).integers(3, len(real), (2, seq))].astype(np.int32)
    ours = np.asarray(transformer.apply(run.graphdef, run.params, ids))[..., real]
    with torch.no_grad():
        theirs = model(torch.from_numpy(order[ids].astype(np.int64))).logits.numpy()
    prompt = ids[0, :8].tolist()

    def ours_gen():
        return generate(run.graphdef, run.params, run.cfg, [prompt], max_new_tokens=new_tokens,
                        temperature=0.0, eos_id=-1)[0]

    def hf_gen():
        with torch.no_grad():
            out = model.generate(torch.tensor([order[prompt].tolist()]), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=PAD_ID)
        return np.argsort(order)[out[0, len(prompt):].numpy()].tolist()

    a, b = ours_gen(), hf_gen()  # warm-up (compiles ours)
    t_ours, t_hf = [], []
    for _ in range(3):
        for fn, times in ((ours_gen, t_ours), (hf_gen, t_hf)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"max_abs_logit_diff": float(np.abs(ours - theirs).max()),
            "max_abs_logit": float(np.abs(theirs).max()),
            "greedy_tokens_equal": a == b, "greedy_tokens": len(a),
            "ours_tokens_per_s": new_tokens / min(t_ours),
            "transformers_tokens_per_s": new_tokens / min(t_hf),
            "torch_threads": torch.get_num_threads()}
