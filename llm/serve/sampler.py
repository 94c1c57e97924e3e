"""Autoregressive sampling with a KV cache: greedy, temperature and top-k.

`generate` prefills the cache with a ragged batch of prompts in one forward pass, then decodes one
token per sequence per step inside a jitted `lax.fori_loop`. The cache (`KVCache`, one per layer)
records keys/values by position and the per-sequence valid length is explicit, the layout a
continuous-batching server grows from.
"""

from __future__ import annotations

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.data.objectives import EOS_ID, PAD_ID
from llm.model.attention import KVCache
from llm.model.config import ModelConfig


def init_caches(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "model"
                ) -> tuple[nnx.GraphDef, nnx.State]:
    """Empty caches for every layer, split into (graphdef, state); dtype "model" or "int8"
    (`KVCache`)."""
    caches = nnx.List([KVCache(batch, max_len, cfg, dtype) for _ in range(cfg.num_layers)])
    return nnx.split(caches)


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """logits [batch, vocab] fp32 -> token ids [batch]. temperature 0 = greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_graphdef", "max_new_tokens",
                                             "temperature", "top_k", "eos_id"))
def _generate(graphdef, params, cache_graphdef, cache_state, prompts, lengths, rng, *,
              max_new_tokens: int, temperature: float, top_k: int, eos_id: int):
    def forward(cache_state, tokens, positions, cache_lengths):
        # Merged inside each trace: nnx objects must not be mutated across trace levels.
        model = nnx.merge(graphdef, params)
        caches = nnx.merge(cache_graphdef, cache_state)
        logits = model(tokens, positions=positions, caches=list(caches),
                       cache_lengths=cache_lengths)
        return logits, nnx.state(caches)

    batch, prompt_len = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len), prompts.shape)
    logits, cache_state = forward(cache_state, prompts, positions,
                                  jnp.zeros((batch,), jnp.int32))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    out = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)

    def body(i, carry):
        out, last, cache_state, lengths, done, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_token(last, key, temperature, top_k)
        tok = jnp.where(done, PAD_ID, tok)
        out = out.at[:, i].set(tok)
        done = done | (tok == eos_id)
        logits, cache_state = forward(cache_state, tok[:, None], lengths[:, None], lengths)
        return out, logits[:, 0], cache_state, lengths + 1, done, rng

    init = (out, last, cache_state, lengths, jnp.zeros((batch,), bool), rng)
    out, *_ = jax.lax.fori_loop(0, max_new_tokens, body, init)
    return out


@gin.configurable
def generate(graphdef: nnx.GraphDef, params: dict, cfg: ModelConfig, prompts: list[list[int]],
             *, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, eos_id: int = EOS_ID, kv_cache_dtype: str = "model"
             ) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.
    kv_cache_dtype: "model" (the compute dtype) or "int8" (`KVCache`; gin:
    `generate.kv_cache_dtype = 'int8'`).

    Returns the new tokens per prompt, cut at (and excluding) the first EOS.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token.")
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.full((len(prompts), int(lengths.max())), PAD_ID, np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    max_len = padded.shape[1] + max_new_tokens
    if cfg.position == "learned" and max_len > cfg.max_seq_len:
        raise ValueError(f"generate: prompt + new tokens = {max_len} exceeds the learned position "
                         f"table (ModelConfig.max_seq_len={cfg.max_seq_len}).")
    cache_graphdef, cache_state = init_caches(cfg, len(prompts), max_len, kv_cache_dtype)
    out = _generate(graphdef, params, cache_graphdef, cache_state, jnp.asarray(padded),
                    jnp.asarray(lengths), jax.random.key(seed), max_new_tokens=max_new_tokens,
                    temperature=float(temperature), top_k=int(top_k), eos_id=eos_id)
    result = []
    for row in np.asarray(out).tolist():
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result
