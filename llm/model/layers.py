"""Building blocks: dense projections, embeddings, norms, MLPs and position encodings.

Every parameter is an `nnx.Param` with `logical_axes` metadata naming its dimensions; the mesh
rules in `llm.parallel.rules` turn those into shardings. Computation runs in the config's compute
dtype; parameters are stored in param_dtype and cast at use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model.config import ModelConfig


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, std: float,
          dtype, init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names. init: 'normal' (truncated at 2 std), 'ones', 'zeros'."""
    if len(shape) != len(axes):
        raise ValueError(f"param: shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Dense(nnx.Module):
    """y = x . W (+ b), contracting the last len(in_shape) dims of x with W's leading dims.

    W: [*in_shape, *out_shape] with logical names in_axes + out_axes.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
                 in_axes: Sequence[str | None], out_axes: Sequence[str | None], cfg: ModelConfig,
                 rngs: nnx.Rngs, *, use_bias: bool | None = None, std: float | None = None):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes),
                            std=std if std is not None else cfg.init_std, dtype=cfg.param_dtype)
        use_bias = cfg.use_bias if use_bias is None else use_bias
        self.bias = (param(rngs, out_shape, out_axes, std=0.0, dtype=cfg.param_dtype,
                           init="zeros") if use_bias else None)
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """One 2-D GEMM: [prod(leading dims), prod(in_shape)] x [prod(in_shape), prod(out_shape)].

        Flattening (free reshapes of contiguous dims) makes autodiff's weight gradient a plain
        x^T . dy over the flattened tokens. With the 3-D dot_general the gradient contracted two
        dims (batch, length) and XLA:CPU transposed the cotangent into a copy and ran the dot on
        its slower non-YNN path: ~25% of the MLP's fwd+bwd time (docs/benchmarks.md).
        """
        raw = self.kernel.get_value()
        if getattr(raw, "activations", None) == "int8":  # W8A8 weight (llm.compress.quantize)
            lead, w_in, w_out = x.shape[:x.ndim - self.n_in], raw.shape[:self.n_in], raw.shape[
                self.n_in:]
            y = raw.matmul_2d(x.reshape(math.prod(lead), math.prod(w_in))).astype(self.dtype)
            y = y.reshape(*lead, *w_out)
            return y if self.bias is None else y + self.bias[...].astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        lead, w_in = x.shape[:x.ndim - self.n_in], kernel.shape[:self.n_in]
        w_out = kernel.shape[self.n_in:]
        x2 = x.astype(self.dtype).reshape(math.prod(lead), math.prod(w_in))
        y = jnp.dot(x2, kernel.reshape(math.prod(w_in), math.prod(w_out)))
        y = y.reshape(*lead, *w_out)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` reuses it as the (tied) output layer."""

    def __init__(self, num: int, cfg: ModelConfig, rngs: nnx.Rngs,
                 axes: tuple[str | None, str] = ("vocab", "embed")):
        self.embedding = param(rngs, (num, cfg.d_model), axes, std=cfg.init_std,
                               dtype=cfg.param_dtype)
        self.dtype = cfg.compute_dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [batch, seq] int -> [batch, seq, embed]."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [batch, seq, embed] -> fp32 logits [batch, seq, vocab] (see `tied_logits`)."""
        lead = x.shape[:-1]
        raw = self.embedding.get_value()
        if getattr(raw, "activations", None) == "int8":  # W8A8 table (llm.compress.quantize)
            logits = raw.matmul_2d(x.reshape(-1, x.shape[-1]))
            return logits.reshape(*lead, logits.shape[-1])
        logits = tied_logits(x.astype(self.dtype).reshape(-1, x.shape[-1]),
                             self.embedding[...].astype(self.dtype))
        return logits.reshape(*lead, logits.shape[-1])


@jax.custom_vjp
def tied_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [tokens, embed] . table [vocab, embed]^T -> fp32 logits [tokens, vocab].

    The backward is written out so that the table's gradient is computed as
    (x^T [embed, tokens] . dlogits [tokens, vocab])^T: the transposes are of the small arrays
    (x, and the [embed, vocab] result). Left to autodiff, XLA:CPU computes dlogits^T . x and
    writes the [tokens, vocab] cotangent -- the largest array of the step -- transposed into a
    strided copy (with the loss's fused softmax backward, ~12% of a GPT-2-tiny CPU step). The
    optimization barriers keep XLA from folding the transposes back into the dot. Same math,
    fp32 accumulation; with bf16 compute the cotangent is cast to bf16 for the two matmuls.
    """
    return jnp.dot(x, table.T, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, table):
    return tied_logits(x, table), (x, table)


def _tied_logits_bwd(res, g):
    x, table = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, table, preferred_element_type=jnp.float32).astype(x.dtype)
    x_t = jax.lax.optimization_barrier(x.T)
    d_table_t = jax.lax.optimization_barrier(
        jnp.dot(x_t, g, preferred_element_type=jnp.float32))
    return dx, d_table_t.T.astype(table.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last dim, computed in fp32, returned in compute dtype."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.scale = param(rngs, (cfg.d_model,), ("embed",), std=0.0, dtype=cfg.param_dtype,
                           init="ones")
        self.bias = (param(rngs, (cfg.d_model,), ("embed",), std=0.0, dtype=cfg.param_dtype,
                           init="zeros") if cfg.norm == "layernorm" else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)


@jax.checkpoint
def _gelu(h: jax.Array) -> jax.Array:
    """tanh-GELU whose backward keeps only its input: tanh(.) and the output are recomputed
    there (elementwise, cheap) instead of being held from the forward to the backward, two
    [tokens, mlp] buffers per layer fewer in the step's peak memory (as torch.compile's
    partitioner does)."""
    return jax.nn.gelu(h, approximate=True)


class MLP(nnx.Module):
    """SwiGLU (LLaMA) or GELU (GPT-2) feed-forward: [batch, seq, embed] -> same."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.hidden_dim
        self.activation = cfg.activation
        self.wi = Dense((d,), (f,), ("embed",), ("mlp",), cfg, rngs)
        self.wg = (Dense((d,), (f,), ("embed",), ("mlp",), cfg, rngs)
                   if cfg.activation == "swiglu" else None)
        self.wo = Dense((f,), (d,), ("mlp",), ("embed",), cfg, rngs,
                        std=cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        from llm.parallel.rules import constrain

        h = self.wi(x)
        if self.wg is not None:
            h = jax.nn.silu(self.wg(x)) * h
        else:
            h = _gelu(h)
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return self.wo(h)


def rope(x: jax.Array, positions: jax.Array, theta: float, *,
         inv_freq: jax.Array | None = None, scale: float = 1.0) -> jax.Array:
    """Rotary position embedding (rotate-half form).

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Computed in fp32.
    inv_freq: the rotation frequencies, [head_dim/2] or per row [batch, head_dim/2]; None is
    plain RoPE, theta^(-2i/head_dim). scale multiplies cos and sin (YaRN's attention factor).
    `rope_frequencies` gives both for a config's `rope_scaling`.
    """
    half = x.shape[-1] // 2
    if inv_freq is None:
        freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    else:
        freq = inv_freq.astype(jnp.float32)
        if freq.ndim == 2:
            freq = freq[:, None, None, :]  # [b, 1, 1, half]
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, s, 1, half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    if scale != 1.0:
        sin, cos = sin * scale, cos * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array | None, float]:
    """(inv_freq, scale) for `rope` under `cfg.rope_scaling`, with the formulas of Hugging Face
    transformers' `modeling_rope_utils` (d = head_dim, f = theta^(-2i/d), i < d/2):

      none    f (returns None: `rope`'s own expression, bitwise as before)
      linear  f / factor (position interpolation)
      llama3  f where the wavelength 2pi/f < L/high_freq_factor; f/factor where it is
              > L/low_freq_factor; between, (1-s) f/factor + s f with
              s = (L/wavelength - low) / (high - low); L = rope_original_max_len
      yarn    f_interp (1 - e) + f e, f_interp = f/factor, e = 1 - ramp(low, high) over i,
              [low, high] the dimensions that turn beta_fast / beta_slow times in L (floored /
              ceiled when rope_truncate); scale = rope_attention_factor or 0.1 ln(factor) + 1
      dynamic NTK: theta' = theta * (factor * n / L - (factor - 1))^(d/(d-2)) with
              n = max(max position of the row + 1, L), L = rope_original_max_len or max_seq_len;
              per row ([batch, d/2]): rows never change each other's frequencies. transformers
              takes n over the whole batch and keeps the largest n seen until it drops below L;
              the two agree on unpadded rows of one length and on token-by-token decoding.

    positions: [batch, seq] int -> inv_freq [d/2] (or [batch, d/2] for dynamic), fp32.
    """
    import numpy as np

    kind = cfg.rope_scaling
    if kind == "none":
        return None, 1.0
    d = cfg.dim_per_head
    base = np.float64(cfg.rope_theta) ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    factor = cfg.rope_factor
    if kind == "dynamic":
        length = cfg.rope_original_max_len or cfg.max_seq_len
        n = jnp.maximum(jnp.max(positions, axis=-1).astype(jnp.float32) + 1, length)  # [b]
        theta = cfg.rope_theta * (factor * n / length - (factor - 1)) ** (d / (d - 2))
        exponent = jnp.arange(0, d, 2, dtype=jnp.float32) / d
        return 1.0 / theta[:, None] ** exponent[None, :], 1.0  # transformers' order of ops
    if kind == "linear":
        return jnp.asarray(base / factor, jnp.float32), 1.0
    length = cfg.rope_original_max_len
    if kind == "llama3":
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / base
        freq = np.where(wavelen > length / low, base / factor, base)
        smooth = (length / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * freq / factor + smooth * freq
        medium = (wavelen >= length / high) & (wavelen <= length / low)
        return jnp.asarray(np.where(medium, smoothed, freq), jnp.float32), 1.0
    # yarn
    def correction_dim(rotations: float) -> float:
        return d * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    freq = base / factor * (1 - extrapolation) + base * extrapolation
    scale = cfg.rope_attention_factor
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return jnp.asarray(freq, jnp.float32), float(scale)


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
    """Fixed sinusoidal position encoding (Vaswani et al.): [batch, seq] -> [batch, seq, dim]."""
    half = dim // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
