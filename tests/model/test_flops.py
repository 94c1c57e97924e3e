"""FLOP counts against hand-counted FLOPs of tiny configs, to the exact number.

Convention (llm.model.config.attention_flops): 2 FLOPs per multiply-add, matmuls only (biases,
norms, softmax not counted), training = 3 x forward, causal self-attention counted half
(seq^2 / 2 query-key pairs), bidirectional and cross-attention in full. Every expected number
below is written out matmul by matmul from the dimensions, not from the code's formula.
"""

from llm.model.config import ModelConfig, attention_flops
from llm.model.encoder_decoder import flops_per_row

# d_model 16, 4 heads of 4, 2 KV heads, SwiGLU 48, 2 layers, vocab 64.
TINY_LLAMA = dict(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=48)


def mm(n_in: int, n_out: int) -> int:
    """Forward FLOPs of one token through an [n_in, n_out] weight."""
    return 2 * n_in * n_out


def test_llama_style_decoder_per_token():
    seq = 8
    layer = (mm(16, 16)        # q: 4 heads x 4
             + mm(16, 8)       # k: 2 KV heads x 4
             + mm(16, 8)       # v
             + mm(16, 16)      # o
             + 3 * mm(16, 48))  # gate, up, down
    assert layer == 6144
    logits = mm(16, 64)  # tied output projection (a matmul like any other)
    # attention of one sequence, one layer: seq*seq/2 pairs x 4 heads x (q.k: 2*4 FLOPs, p*v:
    # 2*4 FLOPs) = 32 * 4 * 16 = 2048; per token: / seq.
    attention_per_token = 2 * (8 * 8 // 2) * 4 * (2 * 4 + 2 * 4) // seq
    assert attention_per_token == 512
    forward = 2 * layer + logits + attention_per_token
    assert forward == 14848
    expected = 3 * forward
    assert ModelConfig(**TINY_LLAMA).flops_per_token(seq) == expected == 44544
    # Untied: the output projection is the same matmul, so the same count.
    assert ModelConfig(**TINY_LLAMA, tie_embeddings=False).flops_per_token(seq) == expected


def test_gpt2_style_decoder_per_token():
    """Biases, learned positions (a gather) and LayerNorm add no matmul FLOPs."""
    cfg = ModelConfig(vocab_size=32, d_model=8, num_layers=1, num_heads=2, norm="layernorm",
                      position="learned", max_seq_len=16, activation="gelu", use_bias=True)
    seq = 4
    layer = 4 * mm(8, 8) + mm(8, 32) + mm(32, 8)  # q, k, v, o; fc, out (4 x d_model)
    logits = mm(8, 32)
    # 4*4/2 = 8 pairs x 2 heads x (8 + 8) FLOPs = 256 per sequence -> 64 per token
    attention_per_token = (4 * 4 // 2) * 2 * 16 // seq
    assert 3 * (layer + logits + attention_per_token) == 6336
    assert cfg.flops_per_token(seq) == 6336


def test_encoder_decoder_per_row():
    cfg = ModelConfig(**TINY_LLAMA)
    enc_len, dec_len = 6, 4
    self_layer = 2 * mm(16, 16) + 2 * mm(16, 8) + 3 * mm(16, 48)  # q, o, k, v, MLP = 6144
    cross_kv = 2 * mm(16, 8)   # cross-attention k, v: run over the encoder tokens
    cross_qo = 2 * mm(16, 16)  # cross-attention q, o: run over the decoder tokens
    per_pair = 4 * (2 * 4 + 2 * 4)  # 4 heads x (q.k + p*v), head_dim 4
    encoder = (enc_len * 2 * (self_layer + cross_kv)      # 2 encoder layers; 2 decoder layers'
               + 2 * (enc_len * enc_len) * per_pair)      # k/v; bidirectional self-attention
    decoder = (dec_len * (2 * (self_layer + cross_qo) + mm(16, 64))
               + 2 * (dec_len * dec_len // 2) * per_pair  # causal self-attention, half
               + 2 * (dec_len * enc_len) * per_pair)      # cross-attention, full
    assert (encoder, decoder) == (84480, 69632)
    assert flops_per_row(cfg, "encoder_decoder", enc_len, dec_len) == 3 * (encoder + decoder)
    assert 3 * (encoder + decoder) == 462336


def test_encoder_only_per_row():
    """BERT-style: bidirectional layers, the MLM head's dense, the output projection."""
    cfg = ModelConfig(**TINY_LLAMA)
    seq = 6
    per_token = 2 * (2 * mm(16, 16) + 2 * mm(16, 8) + 3 * mm(16, 48)) + mm(16, 16) + mm(16, 64)
    attention = 2 * (seq * seq) * 4 * (2 * 4 + 2 * 4)
    assert 3 * (seq * per_token + attention) == 281088
    assert flops_per_row(cfg, "encoder", seq) == 281088


def test_attention_flops_convention():
    # causal = half of full; full = 4 * q * kv * heads * head_dim
    assert attention_flops(128, 128, 2, 64, causal=False) == 4 * 128 * 128 * 2 * 64
    assert attention_flops(128, 128, 2, 64, causal=True) == 2 * 128 * 128 * 2 * 64
