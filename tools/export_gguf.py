"""Export a run directory's LLaMA-style decoder as GGUF (llama.cpp's file format).

    python -m tools.export_gguf --run_dir=runs/X --out=model.gguf [--type=f32|f16|q8_0] [--step=N]

Written with the `gguf` package (the writer llama.cpp's own converters use):
  * metadata: general.architecture="llama", context/embedding/feed-forward lengths, block count,
    head counts (GQA), RMSNorm epsilon, RoPE base and dimension, general.file_type;
  * tokenizer: tokenizer.ggml.model="llama" (SentencePiece): every piece with its score and type
    (normal / unknown / control / user-defined / byte), eos=1, pad=0, unk=2, no BOS, no space
    prefix (our SentencePiece options); model rows past the tokenizer (a padded vocabulary)
    become UNUSED "[PAD<i>]" tokens;
  * tensors in llama.cpp's names, [out, in] as torch stores them. f32: all F32; f16: matrices
    F16; q8_0: matrices Q8_0 (blocks of 32 with one fp16 scale); norms stay F32 in every type.
  * q and k rows are permuted from our rotate-half RoPE layout to llama.cpp's interleaved pairs
    (the same permutation as llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`);
  * RoPE scaling: linear and llama3 as the `rope_freqs.weight` factors (`rope_freq_factors`);
    YaRN as llama.cpp's rope.scaling.* keys (`add_rope_scaling`); dynamic NTK, which llama.cpp
    does not have, is refused in one line naming the fix (`check_gguf_rope`).
GPT-2-style runs are not exported (ConfigError); use `tools.hf export` for them.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from llm.config import ConfigError
from llm.data.objectives import EOS_ID, PAD_ID, UNK_ID
from llm.data.sources import DataError

TYPES = ("f32", "f16", "q8_0")
# llama.cpp's token ids are int32 (llama_token) and its SentencePiece vocab loader stores each
# piece's text; a vocabulary this large cannot be a SentencePiece model llama.cpp loads.
MAX_VOCAB = 2**31 - 1


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[heads*head_dim, in] rows in rotate-half order (dims i and i+head_dim/2 form a pair) ->
    interleaved order (dims 2i and 2i+1 form a pair), per head."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def rope_freq_factors(cfg) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor [head_dim/2] for a linear or llama3 RoPE: it rotates
    dimension pair i by pos * theta^(-2i/d) / factor_i, so factor_i = plain frequency / our
    scaled frequency (how llama.cpp's own converter writes llama3 scaling)."""
    import jax.numpy as jnp

    from llm.model.layers import rope_frequencies

    if cfg.rope_scaling not in ("linear", "llama3"):
        raise ConfigError(f"rope_freqs factors exist for linear and llama3 RoPE only, not "
                          f"ModelConfig.rope_scaling={cfg.rope_scaling!r}.")
    inv_freq, _ = rope_frequencies(cfg, jnp.zeros((1, 1), jnp.int32))
    d = cfg.dim_per_head
    plain = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    return (plain / np.asarray(inv_freq, np.float64)).astype(np.float32)


def yarn_default_attention_factor(factor: float) -> float:
    """The magnitude llama.cpp's YaRN RoPE (ggml rope_yarn) puts on cos/sin by itself:
    1 + 0.1 ln(factor), transformers' default attention factor too."""
    return 1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0


def check_gguf_rope(cfg) -> None:
    """ConfigError, naming the setting and the fix, for RoPE settings llama.cpp cannot run."""
    if cfg.rope_scaling == "dynamic":
        raise ConfigError("GGUF export of ModelConfig.rope_scaling='dynamic' (dynamic NTK) is "
                          "not supported: llama.cpp has no dynamic NTK RoPE (its scaling types "
                          "are linear, yarn, longrope); export with `python -m tools.hf export` "
                          "(transformers runs it), or set ModelConfig.rope_scaling to 'yarn' or "
                          "'linear'.")
    if cfg.rope_scaling == "yarn":
        if not cfg.rope_truncate:
            raise ConfigError("GGUF export of YaRN with ModelConfig.rope_truncate=False is not "
                              "supported: llama.cpp always rounds the correction range to whole "
                              "dimensions; set rope_truncate=True or use `python -m tools.hf "
                              "export`.")
        default = yarn_default_attention_factor(cfg.rope_factor)
        if cfg.rope_attention_factor is not None and \
                abs(cfg.rope_attention_factor - default) > 1e-6 * default:
            raise ConfigError(f"GGUF export of YaRN with ModelConfig.rope_attention_factor="
                              f"{cfg.rope_attention_factor} is not supported: llama.cpp's llama "
                              f"architecture applies only 1 + 0.1 ln(factor) = {default:.6g}; set "
                              "rope_attention_factor=None or use `python -m tools.hf export`.")


def add_rope_scaling(writer, cfg) -> None:
    """llama.cpp's YaRN keys (gguf-py's Keys.Rope): rope.scaling.type = yarn, .factor,
    .original_context_length, .yarn_beta_fast / .yarn_beta_slow; llama.cpp then runs the
    same per-dimension ramp as transformers (extrapolation factor 1) with its default
    attention magnitude 1 + 0.1 ln(factor)."""
    import gguf

    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(cfg.rope_factor)
    writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_len or cfg.max_seq_len)
    writer.add_rope_scaling_yarn_beta_fast(cfg.rope_beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(cfg.rope_beta_slow)


def gguf_tensors(cfg, params: dict) -> dict[str, np.ndarray]:
    """llama.cpp tensor names -> fp32 arrays ([out, in]) of a LLaMA-style model."""
    from llm.interop.hf import architecture, to_hf_state

    if architecture(cfg) != "LlamaForCausalLM":
        raise ConfigError("GGUF export supports LLaMA-style runs (ModelConfig norm='rmsnorm', "
                          f"position='rope', activation='swiglu'); this run is {architecture(cfg)}"
                          "-style. Use `python -m tools.hf export` instead.")
    if cfg.use_bias:
        raise ConfigError("GGUF export of LLaMA-style models with ModelConfig.use_bias=True is not "
                          "supported (llama.cpp's llama architecture has no MLP biases).")
    check_gguf_rope(cfg)
    hf = to_hf_state(cfg, params)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"]}
    if cfg.rope_scaling in ("linear", "llama3"):
        out["rope_freqs.weight"] = rope_freq_factors(cfg)
    if not cfg.tie_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_layers):
        for theirs, ours in names.items():
            w = hf[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                w = permute_rope(w, cfg.num_heads)
            elif ours == "attn_k":
                w = permute_rope(w, cfg.kv_heads)
            out[f"blk.{i}.{ours}.weight"] = w
    return out


def export_gguf(run_dir: str, out_path: str, qtype: str = "f32", step: int | None = None) -> str:
    """Write `run_dir`'s checkpoint as a GGUF file of type `qtype` (f32 | f16 | q8_0)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    from llm.runs import load_run

    if qtype not in TYPES:
        raise ConfigError(f"--type={qtype!r} is not one of {', '.join(TYPES)}.")
    run = load_run(run_dir, step=step)
    cfg = run.cfg
    tensors = gguf_tensors(cfg, run.params)
    if type(run.tokenizer).__name__ == "HFTokenizer":
        raise DataError(f"run {run_dir!r} has a Hugging Face tokenizer.json (imported byte-level "
                        "BPE); GGUF export writes SentencePiece vocabularies only. Convert the "
                        "source directory with llama.cpp's convert_hf_to_gguf.py instead.")
    with open(run.tokenizer.model_path, "rb") as f:
        proto = pb.ModelProto.FromString(f.read())
    pieces = list(proto.pieces)
    if len(pieces) > cfg.vocab_size or cfg.vocab_size > MAX_VOCAB:
        raise DataError(f"the tokenizer has {len(pieces)} pieces and the model {cfg.vocab_size} "
                        f"rows; GGUF needs pieces <= rows <= {MAX_VOCAB} (llama.cpp's int32 "
                        "token ids).")
    kinds = {pb.ModelProto.SentencePiece.NORMAL: gguf.TokenType.NORMAL,
             pb.ModelProto.SentencePiece.UNKNOWN: gguf.TokenType.UNKNOWN,
             pb.ModelProto.SentencePiece.CONTROL: gguf.TokenType.CONTROL,
             pb.ModelProto.SentencePiece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
             pb.ModelProto.SentencePiece.BYTE: gguf.TokenType.BYTE,
             pb.ModelProto.SentencePiece.UNUSED: gguf.TokenType.UNUSED}
    tokens = [p.piece.encode() for p in pieces]
    scores = [float(p.score) for p in pieces]
    types = [int(kinds[p.type]) for p in pieces]
    for i in range(len(pieces), cfg.vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_name(run.name)
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(run.seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.dim_per_head)
    writer.add_value_length(cfg.dim_per_head)
    writer.add_rope_dimension_count(cfg.dim_per_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_scaling == "yarn":
        add_rope_scaling(writer, cfg)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    for name, w in tensors.items():
        w = np.ascontiguousarray(w, np.float32)
        if w.ndim == 1 or qtype == "f32":
            writer.add_tensor(name, w)
        elif qtype == "f16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export_gguf",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--type", default="f32", help="f32 | f16 | q8_0")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    args = parser.parse_args(argv)
    try:
        print(export_gguf(args.run_dir, args.out, args.type, args.step))
    except (ConfigError, DataError) as e:
        print(f"export_gguf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
