"""Encoder-only (BERT-style) and encoder-decoder (T5-style) transformers.

Both reuse the decoder's layers: `transformer.Block` with `causal=False` is the encoder block, and
the encoder-decoder's decoder block adds `attention.CrossAttention` between self-attention and
the MLP. The same `ModelConfig` describes them (norm, positions, activation, widths, attention
implementation); the encoder-decoder has `ModelConfig.num_layers` encoder layers and as many
decoder layers, and one embedding table shared by encoder, decoder and (tied) output.

Functional use, as for the decoder:

    graphdef, params = transformer.init(cfg, rng, Encoder)        # or EncoderDecoder
    logits = transformer.apply(graphdef, params, inputs, positions=..., segment_ids=...)
    logits = transformer.apply(graphdef, params, encoder_inputs, decoder_inputs, ...)

New parameters carry logical axes the mesh rule sets already map: cross-attention uses the
self-attention names (embed, heads, kv_heads, head_dim), the BERT head's transform is
(embed, mlp) with a (mlp,) bias and its output bias is (vocab,).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model.attention import Attention, CrossAttention
from llm.model.config import ModelConfig, attention_flops
from llm.model.layers import MLP, Dense, Embed, Norm, param
from llm.model.transformer import Block, _run_block_remat, embed_tokens
from llm.parallel.rules import constrain


def _default_positions(ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


class _Embeddings(nnx.Module):
    """Token table (+ learned positions) and the output projection (tied or not)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg, rngs)
        self.pos_embed = (Embed(cfg.max_seq_len, cfg, rngs, axes=(None, "embed"))
                          if cfg.position == "learned" else None)
        self.lm_head = (None if cfg.tie_embeddings else
                        Dense((cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), cfg,
                              rngs, use_bias=False))

    def __call__(self, ids: jax.Array, positions: jax.Array) -> jax.Array:
        return embed_tokens(self.embed, self.pos_embed, self.cfg, ids, positions)

    def logits(self, x: jax.Array) -> jax.Array:
        """x [batch, seq, embed] -> fp32 logits [batch, seq, vocab]."""
        if self.lm_head is None:
            return self.embed.attend(x)
        return self.lm_head(x).astype(jnp.float32)


class Encoder(nnx.Module):
    """BERT-style encoder-only model: bidirectional blocks and an MLM head.

    Token ids [batch, seq] -> fp32 logits [batch, seq, vocab]. The head is BERT's: dense +
    GELU + norm, then the (tied) output projection plus a per-token bias.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg, rngs)
        for i in range(cfg.num_layers):
            setattr(self, f"layer_{i}", Block(cfg, rngs, causal=False))
        self.final_norm = Norm(cfg, rngs)
        self.head_transform = Dense((cfg.d_model,), (cfg.d_model,), ("embed",), ("mlp",), cfg,
                                    rngs, use_bias=True)
        self.head_norm = Norm(cfg, rngs)
        self.head_bias = param(rngs, (cfg.vocab_size,), ("vocab",), std=0.0,
                               dtype=cfg.param_dtype, init="zeros")

    def layers(self) -> list[Block]:
        return [getattr(self, f"layer_{i}") for i in range(self.cfg.num_layers)]

    def __call__(self, inputs: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """inputs, positions, segment_ids [batch, seq] int32 -> logits [batch, seq, vocab].
        Every token attends to every token of its own segment (both directions)."""
        positions = _default_positions(inputs) if positions is None else positions
        x = self.embeddings(inputs, positions)
        for block in self.layers():
            if self.cfg.remat == "block":
                x = _run_block_remat(block, x, positions, segment_ids)
            else:
                x = block(x, positions, segment_ids)
        x = self.final_norm(x)
        h = jax.nn.gelu(self.head_transform(x), approximate=True)
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = self.head_norm(h)
        logits = self.embeddings.logits(h) + self.head_bias[...].astype(jnp.float32)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


class DecoderBlock(nnx.Module):
    """Pre-norm T5 decoder block: causal self-attention, cross-attention, MLP (each residual)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs, causal=True)
        self.cross_norm = Norm(cfg, rngs)
        self.cross = CrossAttention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array, encoded: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None, encoder_segment_ids: jax.Array | None
                 ) -> jax.Array:
        """x [batch, dec_len, embed], encoded [batch, enc_len, embed] -> like x."""
        x = x + self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = x + self.cross(self.cross_norm(x), encoded, segment_ids=segment_ids,
                           context_segment_ids=encoder_segment_ids)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))


def _run_decoder_block(block: DecoderBlock, x, encoded, positions, segment_ids,
                       encoder_segment_ids):
    return block(x, encoded, positions, segment_ids, encoder_segment_ids)


_run_decoder_block_remat = nnx.remat(_run_decoder_block)


class EncoderDecoder(nnx.Module):
    """T5-style encoder-decoder: (encoder ids [batch, enc_len], decoder ids [batch, dec_len]) ->
    fp32 logits [batch, dec_len, vocab]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg, rngs)
        for i in range(cfg.num_layers):
            setattr(self, f"encoder_layer_{i}", Block(cfg, rngs, causal=False))
        self.encoder_norm = Norm(cfg, rngs)
        for i in range(cfg.num_layers):
            setattr(self, f"decoder_layer_{i}", DecoderBlock(cfg, rngs))
        self.decoder_norm = Norm(cfg, rngs)

    def encode(self, inputs: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        """Encoder ids [batch, enc_len] -> encoder output [batch, enc_len, embed]."""
        positions = _default_positions(inputs) if positions is None else positions
        x = self.embeddings(inputs, positions)
        for i in range(self.cfg.num_layers):
            block = getattr(self, f"encoder_layer_{i}")
            if self.cfg.remat == "block":
                x = _run_block_remat(block, x, positions, segment_ids)
            else:
                x = block(x, positions, segment_ids)
        return self.encoder_norm(x)

    def decode(self, decoder_inputs: jax.Array, encoded: jax.Array, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               encoder_segment_ids: jax.Array | None = None) -> jax.Array:
        """Decoder ids [batch, dec_len] (targets shifted right) + encoder output -> logits."""
        positions = _default_positions(decoder_inputs) if positions is None else positions
        x = self.embeddings(decoder_inputs, positions)
        for i in range(self.cfg.num_layers):
            block = getattr(self, f"decoder_layer_{i}")
            if self.cfg.remat == "block":
                x = _run_decoder_block_remat(block, x, encoded, positions, segment_ids,
                                             encoder_segment_ids)
            else:
                x = block(x, encoded, positions, segment_ids, encoder_segment_ids)
        logits = self.embeddings.logits(self.decoder_norm(x))
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, encoder_inputs: jax.Array, decoder_inputs: jax.Array, *,
                 encoder_positions: jax.Array | None = None,
                 encoder_segment_ids: jax.Array | None = None,
                 decoder_positions: jax.Array | None = None,
                 decoder_segment_ids: jax.Array | None = None) -> jax.Array:
        """All id/position/segment arrays int32, [batch, enc_len] or [batch, dec_len]. A decoder
        token of segment s attends causally to decoder tokens of segment s and to the encoder
        tokens of segment s (packed examples stay apart). Returns [batch, dec_len, vocab]."""
        encoded = self.encode(encoder_inputs, positions=encoder_positions,
                              segment_ids=encoder_segment_ids)
        return self.decode(decoder_inputs, encoded, positions=decoder_positions,
                           segment_ids=decoder_segment_ids,
                           encoder_segment_ids=encoder_segment_ids)


MODELS = {"encoder": Encoder, "encoder_decoder": EncoderDecoder}


def num_params(params: dict) -> int:
    """Parameter count of a (possibly abstract) params tree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))


def flops_per_row(cfg: ModelConfig, kind: str, encoder_len: int, decoder_len: int = 0) -> float:
    """Training FLOPs of one row in the convention of `ModelConfig.flops_per_token` (see
    `llm.model.config.attention_flops`): 6 x matmul parameters per token that passes through
    them, plus 3 x the forward attention FLOPs -- bidirectional encoder self-attention in full,
    causal decoder self-attention half, cross-attention (decoder queries x encoder keys) in
    full. Cross-attention's key/value projections run over the encoder tokens, its query/output
    projections over the decoder tokens."""
    d, h, kv, hd, f = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                       cfg.hidden_dim)
    q_o = 2 * d * h * hd  # query + output projections
    k_v = 2 * d * kv * hd  # key + value projections
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * f
    layer = q_o + k_v + mlp
    out = cfg.vocab_size * d
    layers = cfg.num_layers

    def attn(q_len: int, kv_len: int, causal: bool) -> float:
        return 3 * layers * attention_flops(q_len, kv_len, h, hd, causal=causal)

    if kind == "encoder":
        matmul = layers * layer + d * d + out  # + the MLM head's dense and output projection
        return 6 * encoder_len * matmul + attn(encoder_len, encoder_len, False)
    if kind == "encoder_decoder":
        enc = 6 * encoder_len * layers * (layer + k_v) + attn(encoder_len, encoder_len, False)
        dec = (6 * decoder_len * (layers * (layer + q_o) + out)
               + attn(decoder_len, decoder_len, True) + attn(decoder_len, encoder_len, False))
        return enc + dec
    raise ValueError(f"flops_per_row: unknown model kind {kind!r}; choose one of {sorted(MODELS)}.")


def greedy_decode(graphdef: nnx.GraphDef, params: dict, encoder_inputs: jax.Array,
                  encoder_segment_ids: jax.Array, max_len: int, eos_id: int | None = None
                  ) -> jax.Array:
    """Greedy decoding of an EncoderDecoder: encoder ids and segment ids [batch, enc_len] (one
    example per row, segment 1; padding 0) -> decoder tokens [batch, max_len] (after EOS: PAD
    0; eos_id None: decode all max_len tokens). Recomputes the decoder each step (for demos and
    tests; serving uses a KV cache)."""

    @jax.jit
    def run(params, encoder_inputs, encoder_segment_ids):
        model = nnx.merge(graphdef, params)
        encoded = model.encode(encoder_inputs, segment_ids=encoder_segment_ids)
        batch = encoder_inputs.shape[0]
        dec_seg = jnp.ones((batch, max_len), jnp.int32)

        def body(i, carry):
            tokens, done = carry
            inputs = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), tokens[:, :-1]], axis=1)
            logits = model.decode(inputs, encoded, segment_ids=dec_seg,
                                  encoder_segment_ids=encoder_segment_ids)
            nxt = jnp.where(done, 0, jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))
            tokens = tokens.at[:, i].set(nxt)
            return tokens, done | (eos_id is not None and nxt == eos_id)

        tokens = jnp.zeros((batch, max_len), jnp.int32)
        tokens, _ = jax.lax.fori_loop(0, max_len, body, (tokens, jnp.zeros(batch, bool)))
        return tokens

    return run(params, encoder_inputs, encoder_segment_ids)
