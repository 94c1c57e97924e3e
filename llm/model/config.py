"""Model configuration: one frozen dataclass, bound by gin (see gin_configs/models/)."""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

from llm.config import ConfigError

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "sinusoidal")
ACTIVATIONS = ("swiglu", "gelu")
ATTENTION_IMPLS = ("auto", "xla", "xla_blocked", "cpu_flash", "pallas", "cudnn")
REMAT = ("none", "block")
DTYPES = ("float32", "bfloat16")
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn")  # HF rope_type names


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A transformer's shape and numerics, shared by the decoder (`transformer.Decoder`), the
    encoder and the encoder-decoder (`encoder_decoder`). Defaults are a tiny LLaMA-style model.

    LLaMA-style: norm="rmsnorm", position="rope", activation="swiglu", num_kv_heads < num_heads.
    GPT-2-style: norm="layernorm", position="learned", activation="gelu", use_bias=True.
    dtype is the compute dtype; parameters (and optimizer state) stay in param_dtype (fp32).
    Logits and the loss are always fp32.
    """

    vocab_size: int = 8192
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA; otherwise GQA
    head_dim: int | None = None  # None: d_model // num_heads
    mlp_dim: int | None = None  # None: 4*d_model (gelu) or 8/3*d_model rounded up to 64 (swiglu)
    max_seq_len: int = 2048  # size of the learned position table; RoPE has no limit
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    position: str = "rope"
    rope_theta: float = 10000.0
    # RoPE context extension (HF `rope_scaling` / `rope_parameters`; formulas in
    # layers.rope_frequencies). The rope_* settings below apply only to the types named.
    rope_scaling: str = "none"  # "none" | "linear" | "dynamic" | "llama3" | "yarn"
    rope_factor: float = 1.0  # linear, dynamic, llama3, yarn
    rope_original_max_len: int | None = None  # llama3, yarn (required); dynamic (None: max_seq_len)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float | None = None  # yarn; None: 0.1 * ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    activation: str = "swiglu"
    use_bias: bool = False
    tie_embeddings: bool = True
    attention_impl: str = "auto"  # see llm.model.attention.attend
    attention_splits: int = 1  # xla_blocked: independent block loops (llm.kernels.blocked)
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        for field, allowed in (("norm", NORMS), ("position", POSITIONS),
                               ("activation", ACTIVATIONS), ("attention_impl", ATTENTION_IMPLS),
                               ("remat", REMAT), ("dtype", DTYPES), ("param_dtype", DTYPES),
                               ("rope_scaling", ROPE_SCALINGS)):
            if getattr(self, field) not in allowed:
                raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r} is not one of "
                                  f"{', '.join(map(repr, allowed))}; set ModelConfig.{field} to "
                                  "one of them.")
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len",
                      "attention_splits"):
            if getattr(self, field) < 1:
                raise ConfigError(f"ModelConfig.{field}={getattr(self, field)} must be >= 1.")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                              f"ModelConfig.num_kv_heads={self.kv_heads}; set num_kv_heads to a "
                              f"divisor of {self.num_heads}.")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                              f"ModelConfig.num_heads={self.num_heads}; change one of them or "
                              "set ModelConfig.head_dim explicitly.")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got {self.dim_per_head} "
                              f"(ModelConfig.d_model={self.d_model} / num_heads="
                              f"{self.num_heads}); set ModelConfig.head_dim to an even number.")

        if self.rope_scaling != "none":
            if self.position != "rope":
                raise ConfigError(f"ModelConfig.rope_scaling={self.rope_scaling!r} needs "
                                  f"position='rope' (got {self.position!r}); set rope_scaling="
                                  "'none'.")
            if not self.rope_factor > 0:
                raise ConfigError(f"ModelConfig.rope_factor={self.rope_factor} must be > 0.")
            if self.rope_scaling in ("llama3", "yarn") and not self.rope_original_max_len:
                raise ConfigError(f"ModelConfig.rope_scaling={self.rope_scaling!r} needs "
                                  "ModelConfig.rope_original_max_len (the pretraining context, "
                                  "HF original_max_position_embeddings); set it.")
            if self.rope_scaling == "llama3" and \
                    self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ConfigError(f"ModelConfig.rope_high_freq_factor={self.rope_high_freq_factor}"
                                  " must be > ModelConfig.rope_low_freq_factor="
                                  f"{self.rope_low_freq_factor}.")

    def check_seq_len(self, seq_len: int, binding: str = "TrainConfig.seq_len") -> None:
        """Raise ConfigError if rows of `seq_len` tokens do not fit the position table (learned
        positions only: RoPE and sinusoidal encodings have no limit). Without this check the
        lookup past the table reads clamped garbage and the loss is NaN at step 1."""
        if self.position == "learned" and seq_len > self.max_seq_len:
            raise ConfigError(f"{binding}={seq_len} is longer than ModelConfig.max_seq_len="
                              f"{self.max_seq_len}, the size of the learned position table; "
                              f"lower {binding} or raise ModelConfig.max_seq_len to at least "
                              f"{seq_len}.")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_dim is not None:
            return self.mlp_dim
        if self.activation == "gelu":
            return 4 * self.d_model
        return -(-(8 * self.d_model // 3) // 64) * 64

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (matches the built model)."""
        d, h, kv, hd, f = (self.d_model, self.num_heads, self.kv_heads, self.dim_per_head,
                           self.hidden_dim)
        attn = d * hd * (h + 2 * kv) + h * hd * d
        mlp = (3 if self.activation == "swiglu" else 2) * d * f
        norms = (2 if self.norm == "layernorm" else 1) * d
        bias = (hd * (h + 2 * kv) + d + f * (2 if self.activation == "swiglu" else 1) + d
                if self.use_bias else 0)
        per_layer = attn + mlp + 2 * norms + bias
        total = self.num_layers * per_layer + norms
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                total += self.max_seq_len * d
        elif not self.tie_embeddings:
            total += self.vocab_size * d  # the output projection is a matmul, count it
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the decoder at `seq_len`, in the project's one FLOP
        convention (see `attention_flops`): 3 x forward matmul FLOPs, i.e.

          6 * (weight-matrix parameters: attention, MLP, the output projection; not norms,
               biases or the embedding gathers)
          + 3 * layers * attention_flops(seq, seq, heads, head_dim, causal=True) / seq
          = ... + 6 * layers * seq * heads * head_dim.
        """
        d, h, kv, hd, f = (self.d_model, self.num_heads, self.kv_heads, self.dim_per_head,
                           self.hidden_dim)
        per_layer = d * hd * (h + 2 * kv) + h * hd * d  # q, k, v, o
        per_layer += (3 if self.activation == "swiglu" else 2) * d * f
        # weight matrices only: norm scales and biases are not matmuls; one output projection
        matmul_params = self.num_layers * per_layer + self.vocab_size * d
        attention = attention_flops(seq_len, seq_len, self.num_heads, self.dim_per_head,
                                    causal=True)
        return 6 * matmul_params + 3 * self.num_layers * attention / seq_len


def attention_flops(q_len: int, kv_len: int, heads: int, head_dim: int, *,
                    causal: bool) -> float:
    """Forward FLOPs of softmax(q k^T) v for one sequence and one layer: the FLOP convention
    of every MFU and TFLOP/s figure in this project (the model's `flops_per_token`, the
    encoder-decoder's `flops_per_row`, tools/bench_attention.py).

    2 FLOPs per multiply-add; q k^T and p v each cost 2 * q_len * kv_len * heads * head_dim.
    Causal attention is counted half (q_len * kv_len / 2 score entries, as FlashAttention
    counts): the masked half is not work, and a kernel that skips it is not penalised. Softmax,
    masking and scaling are not counted. A training step counts 3x the forward (backward = 2x:
    model FLOPs, as PaLM's MFU), whatever is recomputed (remat, a flash backward).
    """
    flops = 4.0 * q_len * kv_len * heads * head_dim
    return flops / 2 if causal else flops
