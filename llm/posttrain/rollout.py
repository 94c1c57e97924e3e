"""Batched rollouts for RL: sample responses to a batch of prompts with the jitted KV-cache
sampler (`llm.serve.sampler`: one prefill, then a `lax.fori_loop` of one-token decode steps),
and lay prompt + response out as fixed-shape training rows.

    ro = rollout(graphdef, params, cfg, prompts, max_prompt_len=64, max_new_tokens=32,
                 temperature=1.0, top_p=0.95, rng=key)
    ro.tokens [batch, max_prompt_len + max_new_tokens]   prompt then response, right-padded
    ro.response_mask                                      1.0 on generated tokens (EOS included)
    ro.logprobs                                           sampler log-probs of those tokens

Every batch has the same shapes (prompts padded to `max_prompt_len`), so the sampler and the
training steps compile once per run. A prompt longer than `max_prompt_len` keeps its last
`max_prompt_len` tokens (counted in `Rollout.truncated`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.data.objectives import EOS_ID, PAD_ID
from llm.model.config import ModelConfig
from llm.serve.sampler import _generate, init_caches


@dataclasses.dataclass
class Rollout:
    """tokens [batch, seq] int32: prompt (left-aligned, its own length) then the response, then
    PAD_ID. response_mask [batch, seq] fp32: 1 on generated tokens up to and including the first
    EOS. logprobs [batch, seq] fp32: the sampler's log-probability of each generated token under
    softmax(logits / temperature), 0 elsewhere. prompt_lengths [batch]. responses: the generated
    ids per row, cut before EOS. truncated: prompts that were cut to max_prompt_len."""

    tokens: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    prompt_lengths: np.ndarray
    responses: list[list[int]]
    truncated: int

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)


def pad_prompts(prompts: list[list[int]], max_prompt_len: int) -> tuple[np.ndarray, np.ndarray,
                                                                       int]:
    """-> (padded [batch, max_prompt_len] int32, lengths [batch], number truncated)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("rollout: every prompt needs at least one token.")
    padded = np.full((len(prompts), max_prompt_len), PAD_ID, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    truncated = 0
    for i, p in enumerate(prompts):
        if len(p) > max_prompt_len:
            p, truncated = p[-max_prompt_len:], truncated + 1
        padded[i, :len(p)] = p
        lengths[i] = len(p)
    return padded, lengths, truncated


def rollout(graphdef: nnx.GraphDef, params: dict, cfg: ModelConfig, prompts: list[list[int]], *,
            max_prompt_len: int, max_new_tokens: int, rng: jax.Array, temperature: float = 1.0,
            top_p: float = 1.0, top_k: int = 0, eos_id: int = EOS_ID) -> Rollout:
    """Sample up to `max_new_tokens` per prompt (token-id lists) with the KV-cache sampler.
    temperature 0 is greedy; top_k 0 and top_p 1.0 are off. rng: a typed PRNG key."""
    padded, lengths, truncated = pad_prompts(prompts, max_prompt_len)
    seq = max_prompt_len + max_new_tokens
    if cfg.position == "learned" and seq > cfg.max_seq_len:
        raise ValueError(f"rollout: max_prompt_len + max_new_tokens = {seq} exceeds the learned "
                         f"position table (ModelConfig.max_seq_len={cfg.max_seq_len}).")
    cache_graphdef, cache_state = init_caches(cfg, len(prompts), seq)
    new, logp = _generate(graphdef, params, cache_graphdef, cache_state, jnp.asarray(padded),
                          jnp.asarray(lengths), rng, max_new_tokens=max_new_tokens,
                          temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                          eos_id=eos_id)
    return assemble(padded, lengths, np.asarray(new), np.asarray(logp), eos_id, truncated)


def assemble(padded: np.ndarray, lengths: np.ndarray, new: np.ndarray, new_logp: np.ndarray,
             eos_id: int = EOS_ID, truncated: int = 0) -> Rollout:
    """Place each row's response right after its prompt: padded [batch, P], lengths [batch],
    new / new_logp [batch, T] (PAD after EOS) -> Rollout with rows of P + T tokens."""
    batch, max_prompt_len = padded.shape
    steps = new.shape[1]
    tokens = np.full((batch, max_prompt_len + steps), PAD_ID, np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    logprobs = np.zeros(tokens.shape, np.float32)
    responses = []
    for i in range(batch):
        row = new[i].tolist()
        n = row.index(eos_id) + 1 if eos_id in row else steps  # tokens the policy emitted
        start = int(lengths[i])
        tokens[i, :start] = padded[i, :start]
        tokens[i, start:start + n] = row[:n]
        mask[i, start:start + n] = 1.0
        logprobs[i, start:start + n] = new_logp[i, :n]
        responses.append(row[:n - 1] if eos_id in row else row)
    return Rollout(tokens=tokens, response_mask=mask, logprobs=logprobs,
                   prompt_lengths=lengths.copy(), responses=responses, truncated=truncated)
