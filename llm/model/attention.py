"""Multi-head / grouped-query self-attention and the attention-implementation switch.

`attend` is the one place that picks how softmax(QK^T)V is computed:
  xla    - plain jnp (`llm.kernels.reference.mha_reference`), any backend; materialises the
           [batch, heads, q_len, kv_len] scores;
  xla_blocked - blocked online-softmax attention in jnp (`llm.kernels.blocked`), any backend;
           memory linear in the sequence length, causally masked blocks skipped;
  cpu_flash - `llm.kernels.cpu_attention`: a C++ flash-attention kernel (XLA FFI) compiled on
           first use, CPU only; fp32 self-attention without a prefix-LM mask;
  auto   - on CPU, cpu_flash where it applies and the kernel builds here, else xla_blocked when
           q_len or kv_len >= AUTO_BLOCKED_MIN_LEN, else xla (measured in docs/benchmarks.md);
           lowered for another platform from CPU (AOT checks, jax.export) the CPU kernel is left
           out (`jax.lax.platform_dependent`); accelerators keep xla unless pallas or cudnn is
           set.
  pallas - `llm.kernels.flash_attention` (Triton on GPU, Mosaic on TPU, interpreted on CPU);
  cudnn  - `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm.config import ConfigError
from llm.kernels.blocked import blocked_attention
from llm.kernels.reference import attention_mask, mha_reference
from llm.model.config import ModelConfig
from llm.model.layers import Dense, rope, rope_frequencies
from llm.parallel.rules import active_spec, constrain

# Logical names of the attention activations: Q_AXES for q and the output, KV_AXES for k and v
# (their weights use heads / kv_heads / head_dim).
Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


def prefix_lm_mask(prefix: jax.Array) -> jax.Array:
    """prefix [batch, seq] (1/True on prefix positions) -> bool [batch, 1, seq, seq], True where
    query i may see key j: j <= i (causal) or both in the prefix (bidirectional)."""
    return attention_mask(prefix.shape[1], prefix.shape[1], causal=True, prefix=prefix)


AUTO_BLOCKED_MIN_LEN = 256


def resolve_impl(impl: str, q_len: int, kv_len: int) -> str:
    """The jnp implementation `attend` runs for ModelConfig.attention_impl=impl ("auto" resolved
    from the backend and the lengths; where "auto" can use the CPU kernel, `attend` prefers it
    on CPU, see `cpu_kernel_unusable`)."""
    if impl != "auto":
        return impl
    if jax.default_backend() == "cpu" and max(q_len, kv_len) >= AUTO_BLOCKED_MIN_LEN:
        return "xla_blocked"
    return "xla"


def cpu_kernel_unusable(q: jax.Array, k: jax.Array, prefix: jax.Array | None) -> str | None:
    """Why `cpu_flash` cannot run this call here (no compiler, unsupported arguments), or
    None."""
    from llm.kernels import cpu_attention

    ok, why = cpu_attention.available()
    return cpu_attention.supports(q.shape, k.shape, q.dtype, prefix=prefix is not None) if ok \
        else why


def _per_shard(kernel, q, k, v, *, segment_ids, kv_segment_ids, causal, prefix):
    """A custom-call kernel on the active mesh: XLA cannot partition it, so on a multi-device
    mesh it runs per shard (batch and heads split as the activation rules say) instead of
    gathering q/k/v everywhere."""
    from llm.kernels.sharding import sharded_flash_attention

    placed = active_spec(Q_AXES, q.shape)
    kv_placed = active_spec(KV_AXES, k.shape)
    rows = dict(q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)
    if prefix is not None:
        rows["prefix"] = prefix
    if placed is None:
        return kernel(q, k, v, **rows)
    mesh, spec = placed
    batch_axes = spec[0] if len(spec) > 0 else None
    head_axes = spec[2] if len(spec) > 2 else None
    kv_spec = kv_placed[1] if kv_placed else ()
    if head_axes is not None and (len(kv_spec) <= 2 or kv_spec[2] != head_axes):
        head_axes = None  # q and kv heads must split alike to keep GQA groups together
    return sharded_flash_attention(q, k, v, mesh=mesh, batch_axes=batch_axes,
                                   head_axes=head_axes, kernel=kernel, **rows)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None,
           causal: bool, impl: str, kv_segment_ids: jax.Array | None = None,
           prefix: jax.Array | None = None, splits: int = 1) -> jax.Array:
    """q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] -> like q.

    segment_ids [batch, q_len] (and kv_segment_ids [batch, kv_len], default the same): tokens
    attend only within their own segment, so packed documents never see each other.
    causal=False is bidirectional (encoders) and, with q_len != kv_len, cross-attention.
    prefix [batch, seq] (with causal=True, self-attention): prefix-LM masking -- positions marked
    1 see each other bidirectionally, the rest stays causal (`prefix_lm_mask`).
    splits: xla_blocked only, independent block loops (`blocked_attention`; bitwise equal).
    """
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"ModelConfig.attention_impl='cudnn' needs an NVIDIA GPU, but JAX's "
                          f"backend is {jax.default_backend()!r}; use ModelConfig.attention_impl="
                          "'auto' or 'xla' (any backend), or 'pallas'.")
    if impl == "cpu_flash":
        if jax.default_backend() != "cpu":
            raise ConfigError(f"ModelConfig.attention_impl='cpu_flash' is the CPU kernel, but "
                              f"JAX's backend is {jax.default_backend()!r}; use "
                              "ModelConfig.attention_impl='auto'.")
        why = cpu_kernel_unusable(q, k, prefix)
        if why:
            raise ConfigError(f"ModelConfig.attention_impl='cpu_flash' cannot run here: {why}; "
                              "use ModelConfig.attention_impl='auto' or 'xla_blocked'.")
        return _cpu_flash(q, k, v, segment_ids, kv_segment_ids, causal)
    if impl == "auto" and jax.default_backend() == "cpu" and not cpu_kernel_unusable(q, k,
                                                                                    prefix):
        # The kernel exists only for CPU: lowering for another platform takes the jnp branch.
        fallback = resolve_impl(impl, q.shape[1], k.shape[1])
        return jax.lax.platform_dependent(
            q, k, v, segment_ids, kv_segment_ids,
            cpu=lambda *a: _cpu_flash(*a, causal),
            default=lambda *a: attend(*a[:3], segment_ids=a[3], kv_segment_ids=a[4],
                                      causal=causal, impl=fallback, splits=splits))
    impl = resolve_impl(impl, q.shape[1], k.shape[1])
    if impl == "xla_blocked":
        return blocked_attention(q, k, v, q_segment_ids=segment_ids,
                                 kv_segment_ids=kv_segment_ids, causal=causal, prefix=prefix,
                                 splits=splits)
    if prefix is not None:
        if not causal:
            raise ValueError("attend: a prefix-LM mask only makes sense with causal=True.")
        if impl == "cudnn":
            mask = prefix_lm_mask(prefix)
            if segment_ids is not None:
                mask = mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if impl == "xla":
        return mha_reference(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                             causal=causal, prefix=prefix)
    if impl == "pallas":
        from llm.kernels import flash_attention

        return _per_shard(flash_attention, q, k, v, segment_ids=segment_ids,
                          kv_segment_ids=kv_segment_ids, causal=causal, prefix=prefix)
    if impl == "cudnn":
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            implementation="cudnn")
    raise ConfigError(f"ModelConfig.attention_impl={impl!r} is not one of 'auto', 'xla', "
                      "'xla_blocked', 'cpu_flash', 'pallas', 'cudnn'; set "
                      "ModelConfig.attention_impl to one of them.")


def _cpu_flash(q, k, v, segment_ids, kv_segment_ids, causal):
    from llm.kernels.cpu_attention import cpu_flash_attention

    return _per_shard(cpu_flash_attention, q, k, v, segment_ids=segment_ids,
                      kv_segment_ids=kv_segment_ids, causal=causal, prefix=None)


KV_CACHE_DTYPES = ("model", "int8")


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax int8 per vector: x [..., head_dim] -> (q int8 [..., head_dim],
    scale fp32 [...]) with x ~= q * scale, scale = max|x| / 127, so each element is off by at
    most scale / 2."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Inverse of `quantize_int8`: q [..., head_dim] int8, scale [...] -> [..., head_dim]."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


class KVCache(nnx.Module):
    """Per-layer key/value cache for incremental decoding.

    k, v: [batch, max_len, kv_heads, head_dim]. The number of valid positions per sequence is
    passed in by the caller (`cache_lengths` [batch]), so one cache serves a ragged batch and
    can later back continuous batching in the server.

    dtype "model" stores k/v in the model's compute dtype; "int8" stores them as int8 with one
    fp32 scale per (position, kv head) (`quantize_int8`; k_scale, v_scale [batch, max_len,
    kv_heads]): head_dim + 4 bytes per vector instead of 4 x head_dim in fp32 (3.8x less at
    head_dim 64). Attention reads the dequantized values, so the saving is memory (more slots,
    longer contexts), not arithmetic. Quality against the fp32 cache: docs/serving.md.
    """

    def __init__(self, batch: int, max_len: int, cfg: ModelConfig, dtype: str = "model"):
        if dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"KV cache dtype {dtype!r} is not one of {KV_CACHE_DTYPES}; set "
                              "the kv_cache_dtype setting to 'model' or 'int8'.")
        shape = (batch, max_len, cfg.kv_heads, cfg.dim_per_head)
        self.int8 = dtype == "int8"
        store = jnp.int8 if self.int8 else cfg.compute_dtype
        self.k = nnx.Cache(jnp.zeros(shape, store))
        self.v = nnx.Cache(jnp.zeros(shape, store))
        if self.int8:
            self.k_scale = nnx.Cache(jnp.zeros(shape[:-1], jnp.float32))
            self.v_scale = nnx.Cache(jnp.zeros(shape[:-1], jnp.float32))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, causal: bool = True):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        self.cfg = cfg
        self.causal = causal
        self.q = Dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), cfg, rngs)
        self.k = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), cfg, rngs)
        self.v = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), cfg, rngs)
        self.o = Dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), cfg, rngs,
                       std=cfg.init_std / (2 * cfg.num_layers) ** 0.5)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: KVCache | None = None, cache_lengths: jax.Array | None = None,
                 prefix: jax.Array | None = None) -> jax.Array:
        """x [batch, seq, embed]; positions, segment_ids [batch, seq] -> [batch, seq, embed].

        With `cache`, x holds the new tokens of each sequence; they are written into the cache at
        `cache_lengths` [batch] and attend to the cache's valid prefix plus themselves.
        prefix [batch, seq]: prefix-LM mask (see `attend`); only without a cache.
        """
        q = constrain(self.q(x), Q_AXES)
        k = constrain(self.k(x), KV_AXES)
        v = constrain(self.v(x), KV_AXES)
        if self.cfg.position == "rope":
            inv_freq, scale = rope_frequencies(self.cfg, positions)
            q = rope(q, positions, self.cfg.rope_theta, inv_freq=inv_freq, scale=scale)
            k = rope(k, positions, self.cfg.rope_theta, inv_freq=inv_freq, scale=scale)
        if cache is None:
            out = attend(q, k, v, segment_ids=segment_ids, causal=self.causal,
                         impl=self.cfg.attention_impl, prefix=prefix,
                         splits=self.cfg.attention_splits)
        else:
            out = self._decode(q, k, v, cache, cache_lengths)
        out = constrain(out, Q_AXES)
        return self.o(out)

    def _decode(self, q, k, v, cache: KVCache, lengths: jax.Array) -> jax.Array:
        write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice(
            c, new, (i,) + (0,) * (c.ndim - 1)))
        if cache.int8:
            (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
            cache.k[...] = write(cache.k[...], kq, lengths)
            cache.v[...] = write(cache.v[...], vq, lengths)
            cache.k_scale[...] = write(cache.k_scale[...], ks, lengths)
            cache.v_scale[...] = write(cache.v_scale[...], vs, lengths)
            keys = dequantize_int8(cache.k[...], cache.k_scale[...], q.dtype)
            values = dequantize_int8(cache.v[...], cache.v_scale[...], q.dtype)
        else:
            cache.k[...] = write(cache.k[...], k.astype(cache.k.dtype), lengths)
            cache.v[...] = write(cache.v[...], v.astype(cache.v.dtype), lengths)
            keys, values = cache.k[...], cache.v[...]
        new_lengths = lengths + q.shape[1]
        if self.cfg.attention_impl == "pallas":
            from llm.kernels import decode_attention

            return decode_attention(q, keys, values, new_lengths)
        # Query i of sequence b sits at position lengths[b] + i and sees keys 0..lengths[b] + i.
        q_pos = lengths[:, None] + jnp.arange(q.shape[1])[None, :]
        kv_pos = jnp.arange(keys.shape[1])
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None])[:, None]
        return mha_reference(q, keys, values, causal=False, mask=mask)


class CrossAttention(nnx.Module):
    """Decoder-to-encoder attention (T5): queries from the decoder stream, keys and values from
    the encoder output; no position encoding (the encoder already carries it). Goes through
    `attend` like self-attention, so xla | pallas | cudnn all apply."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        self.cfg = cfg
        self.q = Dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), cfg, rngs)
        self.k = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), cfg, rngs)
        self.v = Dense((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), cfg, rngs)
        self.o = Dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), cfg, rngs,
                       std=cfg.init_std / (2 * cfg.num_layers) ** 0.5)

    def __call__(self, x: jax.Array, context: jax.Array, *, segment_ids: jax.Array | None,
                 context_segment_ids: jax.Array | None) -> jax.Array:
        """x [batch, q_len, embed], context [batch, kv_len, embed]; segment_ids [batch, q_len] and
        context_segment_ids [batch, kv_len] (both or neither): a decoder token sees only the
        encoder tokens of its own packed example. Returns [batch, q_len, embed]."""
        if (segment_ids is None) != (context_segment_ids is None):
            raise ValueError("CrossAttention: pass both segment_ids and context_segment_ids, or "
                             "neither.")
        q = constrain(self.q(x), Q_AXES)
        k = constrain(self.k(context), KV_AXES)
        v = constrain(self.v(context), KV_AXES)
        out = attend(q, k, v, segment_ids=segment_ids, kv_segment_ids=context_segment_ids,
                     causal=False, impl=self.cfg.attention_impl)
        out = constrain(out, Q_AXES)
        return self.o(out)
