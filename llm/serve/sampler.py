"""Autoregressive sampling with a KV cache: greedy, temperature, top-k and top-p.

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


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                 top_p: float = 1.0) -> jax.Array:
    """logits [batch, vocab] fp32 -> token ids [batch]. temperature 0 = greedy.

    top_k 0 and top_p 1.0 are off. Top-p (nucleus) keeps the most likely tokens whose cumulative
    probability, before adding them, is below top_p (the most likely token always stays), after
    temperature and top-k.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ranked = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        last = jnp.sum(keep, axis=-1, keepdims=True) - 1
        logits = jnp.where(logits < jnp.take_along_axis(ranked, last, axis=-1), -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_graphdef", "max_new_tokens",
                                             "temperature", "top_k", "top_p", "eos_id"))
def _generate(graphdef, params, cache_graphdef, cache_state, prompts, lengths, rng, *,
              max_new_tokens: int, temperature: float, top_k: int, eos_id: int,
              top_p: float = 1.0):
    """-> (new tokens [batch, max_new_tokens], their log-probs [batch, max_new_tokens]).

    The log-prob of each sampled token is under softmax(logits / temperature) (no top-k/top-p
    truncation; plain softmax when greedy), 0 after a row's EOS."""
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
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32)

    def body(i, carry):
        out, logprobs, last, cache_state, lengths, done, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_token(last, key, temperature, top_k, top_p)
        logp = jax.nn.log_softmax(last / (temperature or 1.0), axis=-1)
        logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, PAD_ID, tok)
        out = out.at[:, i].set(tok)
        logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, logp))
        done = done | (tok == eos_id)
        logits, cache_state = forward(cache_state, tok[:, None], lengths[:, None], lengths)
        return out, logprobs, logits[:, 0], cache_state, lengths + 1, done, rng

    init = (out, logprobs, last, cache_state, lengths, jnp.zeros((batch,), bool), rng)
    out, logprobs, *_ = jax.lax.fori_loop(0, max_new_tokens, body, init)
    return out, logprobs


@gin.configurable
def generate(graphdef: nnx.GraphDef, params: dict, cfg: ModelConfig, prompts: list[list[int]],
             *, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 1.0, seed: int = 0, eos_id: int = EOS_ID,
             kv_cache_dtype: str = "model") -> list[list[int]]:
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
    out, _ = _generate(graphdef, params, cache_graphdef, cache_state, jnp.asarray(padded),
                       jnp.asarray(lengths), jax.random.key(seed), max_new_tokens=max_new_tokens,
                       temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                       eos_id=eos_id)
    result = []
    for row in np.asarray(out).tolist():
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result
