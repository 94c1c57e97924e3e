"""The decoder (LLaMA- or GPT-2-style, chosen by `ModelConfig`), the residual `Block` that the
encoder and the encoder-decoder (`llm.model.encoder_decoder`) reuse, and the functional interface
the trainer uses for all three: parameters are a plain nested dict of arrays, and

    graphdef, params = init(cfg, rng)
    logits = apply(graphdef, params, inputs, positions=..., segment_ids=...)

are pure functions that jit, shard and checkpoint like any pytree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model.attention import Attention, KVCache
from llm.model.config import ModelConfig
from llm.model.layers import MLP, Dense, Embed, Norm, sinusoidal
from llm.parallel.rules import constrain

Params = dict


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, causal: bool = True):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs, causal=causal)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: KVCache | None = None, cache_lengths: jax.Array | None = None,
                 prefix: jax.Array | None = None) -> jax.Array:
        h = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids,
                      cache=cache, cache_lengths=cache_lengths, prefix=prefix)
        x = constrain(x + h, ("activation_batch", "activation_length", "activation_embed"))
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))


def _run_block(block: Block, x, positions, segment_ids, prefix=None):
    return block(x, positions, segment_ids, prefix=prefix)


_run_block_remat = nnx.remat(_run_block)


def embed_tokens(embed: Embed, pos_embed: Embed | None, cfg: ModelConfig, ids: jax.Array,
                 positions: jax.Array) -> jax.Array:
    """Token embeddings plus learned or sinusoidal positions (RoPE acts inside attention).

    ids, positions [batch, seq] -> [batch, seq, embed]."""
    x = embed(ids)
    if pos_embed is not None:
        x = x + pos_embed(positions)
    elif cfg.position == "sinusoidal":
        x = x + sinusoidal(positions, cfg.d_model).astype(x.dtype)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class Decoder(nnx.Module):
    """Token ids [batch, seq] -> fp32 logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg, rngs)
        self.pos_embed = (Embed(cfg.max_seq_len, cfg, rngs, axes=(None, "embed"))
                          if cfg.position == "learned" else None)
        for i in range(cfg.num_layers):
            setattr(self, f"layer_{i}", Block(cfg, rngs))
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense((cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), cfg,
                              rngs, use_bias=False))

    def layers(self) -> list[Block]:
        return [getattr(self, f"layer_{i}") for i in range(self.cfg.num_layers)]

    def __call__(self, inputs: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, caches: list[KVCache] | None = None,
                 cache_lengths: jax.Array | None = None, prefix: jax.Array | None = None,
                 return_hidden: bool = False) -> jax.Array:
        """inputs, positions, segment_ids: [batch, seq] int32. positions default to 0..seq-1;
        segment_ids None means one document per row. With `caches` (one per layer) the call is an
        incremental decode step (see `Attention`). prefix [batch, seq]: prefix-LM attention
        (positions marked 1 see each other bidirectionally; see `attention.attend`).
        return_hidden: return the final-norm hidden states [batch, seq, embed] (`features`)
        instead of the logits (for scalar heads: reward model, value head)."""
        x = self.features(inputs, positions=positions, segment_ids=segment_ids, caches=caches,
                          cache_lengths=cache_lengths, prefix=prefix)
        if return_hidden:
            return constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return self.logits(x)

    def features(self, inputs: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, caches: list[KVCache] | None = None,
                 cache_lengths: jax.Array | None = None, prefix: jax.Array | None = None
                 ) -> jax.Array:
        """The final-normed hidden states [batch, seq, d_model] (compute dtype) that `logits`
        turns into the vocabulary; arguments as `__call__`."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
        x = embed_tokens(self.embed, self.pos_embed, self.cfg, inputs, positions)
        for i, block in enumerate(self.layers()):
            if caches is not None:
                x = block(x, positions, segment_ids, caches[i], cache_lengths)
            elif self.cfg.remat == "block":
                x = _run_block_remat(block, x, positions, segment_ids, prefix)
            else:
                x = block(x, positions, segment_ids, prefix=prefix)
        return self.final_norm(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Hidden states [batch, seq, d_model] -> fp32 logits [batch, seq, vocab]."""
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def head_weight(self) -> tuple[jax.Array, bool]:
        """(the output projection in compute dtype, vocab_major): the tied embedding table
        [vocab, d_model] (vocab_major=True) or the lm_head kernel [d_model, vocab]."""
        if self.lm_head is None:
            return self.embed.embedding[...].astype(self.embed.dtype), True
        return self.lm_head.kernel[...].astype(self.lm_head.dtype), False


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def init(cfg: ModelConfig, rng: jax.Array, module: type[nnx.Module] = Decoder
         ) -> tuple[nnx.GraphDef, Params]:
    """Build the model (`module(cfg, rngs)`: Decoder, or `encoder_decoder.Encoder` /
    `EncoderDecoder`); returns its graph definition and parameters as a nested dict."""
    graphdef, state = nnx.split(module(cfg, nnx.Rngs(params=rng)), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract(cfg: ModelConfig, module: type[nnx.Module] = Decoder
             ) -> tuple[nnx.GraphDef, Params, dict]:
    """Shapes without allocation: (graphdef, params as ShapeDtypeStructs, logical axes per param).

    The logical-axes tree has the same structure as params, each leaf a tuple of axis names.
    """
    model = nnx.eval_shape(lambda: module(cfg, nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model, nnx.Param)
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=_is_variable)
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes)


def apply(graphdef: nnx.GraphDef, params: Params, inputs: jax.Array, *args, **kwargs
          ) -> jax.Array:
    """Pure forward pass: fp32 logits [batch, seq, vocab]. Arguments as the module's `__call__`
    (`Decoder.__call__` for a decoder)."""
    return nnx.merge(graphdef, params)(inputs, *args, **kwargs)
