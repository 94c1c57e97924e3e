"""GGUF export, read back with the `gguf` package (llama.cpp's own Python reader)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llm.runs import load_run  # noqa: E402
from tools.export_gguf import export_gguf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _field(reader, key):
    return reader.fields[key].contents()


def _interleaved_rope(x, pos, theta):
    """llama.cpp's 'normal' RoPE, written from its definition: dims (2i, 2i+1) rotate by
    pos * theta^(-2i/d). x [..., d]."""
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(pos * freq), np.sin(pos * freq)
    out = x.copy()
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def _llama_cpp_greedy_equals_ours(run, path: str, python: str):
    """llama.cpp (in `python`, an interpreter that imports llama_cpp) loads the F32 GGUF file at
    `path` and gives exactly our sampler's 32 greedy tokens after BOS + "def parse(" (positions
    up to 40, past a 16-position original context where a test scales RoPE)."""
    from llm.serve.engine import BOS_ID
    from llm.serve.sampler import generate
    from tools.llamacpp_worker import LlamaCpp

    prompt = [BOS_ID, *run.tokenizer.encode("def parse(")]
    ours = generate(run.graphdef, run.params, run.cfg, [prompt], max_new_tokens=32,
                    temperature=0.0, top_k=0, eos_id=-1)[0]
    worker = LlamaCpp(path, python=python, threads=1, n_ctx=64)
    try:
        assert worker.generate(prompt, 32)[0] == ours
    finally:
        worker.close()


@pytest.fixture(scope="module")
def gguf_files(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(tiny_run, str(out / f"m-{t}.gguf"), t) for t in ("f32", "f16", "q8_0")}


def test_gguf_metadata_tokenizer_and_tensors(tiny_run, gguf_files):
    import jax.numpy as jnp

    from llm.model.layers import rope

    run = load_run(tiny_run)
    cfg = run.cfg
    r = gguf.GGUFReader(gguf_files["f32"])
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == cfg.num_layers
    assert _field(r, "llama.embedding_length") == cfg.d_model
    assert _field(r, "llama.feed_forward_length") == cfg.hidden_dim
    assert _field(r, "llama.attention.head_count") == cfg.num_heads
    assert _field(r, "llama.attention.head_count_kv") == cfg.kv_heads == 2
    assert _field(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.eos_token_id") == 1
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert [tokens[i] for i in range(run.tokenizer.vocab_size)] == \
        [run.tokenizer.id_to_piece(i) for i in range(run.tokenizer.vocab_size)]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[1] == gguf.TokenType.CONTROL and types[2] == gguf.TokenType.UNKNOWN
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE

    t = {x.name: x for x in r.tensors}
    p = run.params
    emb = np.asarray(p["embed"]["embedding"])
    assert np.array_equal(np.asarray(t["token_embd.weight"].data), emb)
    assert "output.weight" not in t  # tied
    # The q/k permutation: llama.cpp's interleaved RoPE on the exported rows gives the same
    # attention scores as our rotate-half RoPE on our kernel.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cfg.d_model)).astype(np.float32)
    hd = cfg.dim_per_head
    wq = np.asarray(t["blk.0.attn_q.weight"].data).reshape(cfg.num_heads, hd, cfg.d_model)
    wk = np.asarray(t["blk.0.attn_k.weight"].data).reshape(cfg.kv_heads, hd, cfg.d_model)
    q_cpp = _interleaved_rope(np.einsum("hdc,c->hd", wq, x[0]), 7, cfg.rope_theta)
    k_cpp = _interleaved_rope(np.einsum("hdc,c->hd", wk, x[1]), 3, cfg.rope_theta)
    ours_q = np.einsum("c,chd->hd", x[0], np.asarray(p["layer_0"]["attn"]["q"]["kernel"]))
    ours_k = np.einsum("c,chd->hd", x[1], np.asarray(p["layer_0"]["attn"]["k"]["kernel"]))
    q_ours = np.asarray(rope(jnp.asarray(ours_q)[None, None], jnp.array([[7]]),
                             cfg.rope_theta))[0, 0]
    k_ours = np.asarray(rope(jnp.asarray(ours_k)[None, None], jnp.array([[3]]),
                             cfg.rope_theta))[0, 0]
    group = cfg.num_heads // cfg.kv_heads
    s_cpp = np.einsum("hd,hd->h", q_cpp, np.repeat(k_cpp, group, axis=0))
    s_ours = np.einsum("hd,hd->h", q_ours, np.repeat(k_ours, group, axis=0))
    np.testing.assert_allclose(s_cpp, s_ours, rtol=1e-4, atol=1e-5)
    # ... and the rows really were permuted (without the permutation the scores differ).
    q_plain = np.asarray(p["layer_0"]["attn"]["q"]["kernel"]).reshape(cfg.d_model, -1).T
    assert not np.array_equal(wq.reshape(-1, cfg.d_model), q_plain)
    q_wrong = _interleaved_rope(np.einsum("hdc,c->hd", q_plain.reshape(wq.shape), x[0]), 7,
                                cfg.rope_theta)
    assert not np.allclose(np.einsum("hd,hd->h", q_wrong, np.repeat(k_cpp, group, axis=0)),
                           s_ours, rtol=1e-4, atol=1e-5)


def test_gguf_f16_and_q8_0(gguf_files):
    f32 = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(gguf_files["f32"]).tensors}
    r16 = gguf.GGUFReader(gguf_files["f16"])
    r8 = gguf.GGUFReader(gguf_files["q8_0"])
    assert _field(r16, "general.file_type") == 1 and _field(r8, "general.file_type") == 7
    for x in r16.tensors:
        want = f32[x.name]
        if want.ndim == 1:
            assert x.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(x.data), want)
        else:
            assert x.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(np.asarray(x.data), want.astype(np.float16))
    for x in r8.tensors:
        want = f32[x.name]
        if want.ndim == 1:
            assert x.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert x.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type).reshape(want.shape)
        # Q8_0: blocks of 32 values, one scale amax/127; round-to-nearest errs by <= scale/2
        # (plus the fp16 rounding of the scale itself).
        blocks = want.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 128 * 2**-11)
        assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= bound + 1e-12), x.name


def test_gguf_bad_input(tiny_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.export_gguf", f"--run_dir={tiny_run}",
                           f"--out={tmp_path / 'x.gguf'}", "--type=q4_k"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'q4_k'" in proc.stderr

    # A tokenizer with more pieces than the model has rows.
    import shutil

    from llm.data.tokenizer import train_sentencepiece

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run, run_dir)
    import json

    tok_name = json.loads(Path(run_dir, "manifest.json").read_text())["data"]["tokenizer"]
    manifest_tok = os.path.join(run_dir, os.path.basename(tok_name))
    email = Path(os.path.dirname(os.__file__), "email")
    texts = [p.read_text() for p in sorted(email.glob("*.py"))]
    vocab = load_run(run_dir).cfg.vocab_size
    train_sentencepiece(texts, manifest_tok, vocab_size=vocab + 64)
    proc = subprocess.run([sys.executable, "-m", "tools.export_gguf", f"--run_dir={run_dir}",
                           f"--out={tmp_path / 'y.gguf'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{vocab + 64} pieces" in proc.stderr


def test_llama_cpp_greedy_equals_ours(tiny_run, gguf_files):
    """llama.cpp itself (llama-cpp-python, an optional extra that builds llama.cpp from source)
    loads the exported files: F32 gives exactly our sampler's 32 greedy tokens on three prompts;
    Q8_0 agrees on at least half the positions (docs/interop.md states the measured agreement).
    Skipped where no interpreter can import llama_cpp."""
    from llm.serve.engine import BOS_ID
    from llm.serve.sampler import generate
    from tools.llamacpp_worker import LlamaCpp, llama_cpp_python

    python = llama_cpp_python()
    if python is None:
        pytest.skip("llama-cpp-python is not installed here, in $LLAMA_CPP_PYTHON or in "
                    "/tmp/llamacpp-venv (optional extra 'llamacpp'; it compiles llama.cpp, "
                    "~9 min, so CI leaves it out)")
    run = load_run(tiny_run)
    rng = np.random.default_rng(0)
    prompts = [[BOS_ID, *run.tokenizer.encode("def parse(")],
               *([BOS_ID, *rng.integers(3, run.cfg.vocab_size, 8).tolist()] for _ in range(2))]
    ours = generate(run.graphdef, run.params, run.cfg, prompts, max_new_tokens=32,
                    temperature=0.0, top_k=0, eos_id=-1)
    agree = {}
    for qtype in ("f32", "q8_0"):
        worker = LlamaCpp(gguf_files[qtype], python=python, threads=1, n_ctx=64)
        try:
            theirs = [worker.generate(p, 32)[0] for p in prompts]
        finally:
            worker.close()
        agree[qtype] = sum(a == b for o, t in zip(ours, theirs) for a, b in zip(o, t))
        if qtype == "f32":
            assert theirs == ours
    assert agree["q8_0"] >= 48, agree  # of 96 positions


def test_gguf_rope_scaling_llama3(tiny_run, tmp_path):
    """A llama3-scaled RoPE goes into GGUF as llama.cpp's `rope_freqs` factors: equal to
    transformers' own llama3 frequencies (an independent reference), and, where llama.cpp is
    installed, its greedy tokens past the original context equal ours."""
    import shutil

    from llm.config import ConfigError
    from llm.model.config import ModelConfig
    from tools.export_gguf import rope_freq_factors

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run, run_dir)
    with open(os.path.join(run_dir, "config.gin"), "a") as f:
        f.write("\nModelConfig.rope_scaling = 'llama3'\nModelConfig.rope_factor = 4.0\n"
                "ModelConfig.rope_original_max_len = 16\n")
    run = load_run(run_dir)
    cfg = run.cfg
    assert cfg.rope_scaling == "llama3"
    path = export_gguf(run_dir, str(tmp_path / "m.gguf"), "f32")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    factors = tensors["rope_freqs.weight"].reshape(-1)
    assert factors.shape == (cfg.dim_per_head // 2,) and factors.max() > 1.5
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads, head_dim=cfg.dim_per_head,
        max_position_embeddings=64, rope_theta=cfg.rope_theta,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, None)
    plain = cfg.rope_theta ** (-np.arange(0, cfg.dim_per_head, 2) / cfg.dim_per_head)
    np.testing.assert_allclose(factors, plain / theirs.numpy(), rtol=1e-5)
    with pytest.raises(ConfigError, match="linear and llama3 RoPE only"):
        rope_freq_factors(ModelConfig(rope_scaling="yarn", rope_factor=2.0,
                                      rope_original_max_len=16))

    from tools.llamacpp_worker import llama_cpp_python

    python = llama_cpp_python()
    if python is None:
        pytest.skip("llama-cpp-python is not installed (optional extra 'llamacpp')")
    _llama_cpp_greedy_equals_ours(run, path, python)


def test_gguf_rope_scaling_yarn_and_dynamic(tiny_run, tmp_path, capsys):
    """YaRN goes into GGUF as llama.cpp's rope.scaling.* keys (gguf-py's Keys.Rope names, read
    back here); where llama.cpp is installed, its greedy tokens past the original context equal
    ours. Dynamic NTK, which llama.cpp lacks, is one line through the CLI, exit 2."""
    import shutil

    from tools.export_gguf import main
    from tools.llamacpp_worker import llama_cpp_python

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run, run_dir)
    base = Path(run_dir, "config.gin").read_text()
    Path(run_dir, "config.gin").write_text(
        base + "\nModelConfig.rope_scaling = 'yarn'\nModelConfig.rope_factor = 4.0\n"
        "ModelConfig.rope_original_max_len = 16\nModelConfig.rope_beta_fast = 16.0\n")
    path = export_gguf(run_dir, str(tmp_path / "m.gguf"), "f32")
    r = gguf.GGUFReader(path)
    keys = gguf.Keys.Rope
    assert _field(r, keys.SCALING_TYPE.format(arch="llama")) == "yarn"
    assert _field(r, keys.SCALING_FACTOR.format(arch="llama")) == 4.0
    assert _field(r, keys.SCALING_ORIG_CTX_LEN.format(arch="llama")) == 16
    assert _field(r, keys.SCALING_YARN_BETA_FAST.format(arch="llama")) == 16.0
    assert _field(r, keys.SCALING_YARN_BETA_SLOW.format(arch="llama")) == 1.0
    assert "rope_freqs.weight" not in {t.name for t in r.tensors}

    Path(run_dir, "config.gin").write_text(
        base + "\nModelConfig.rope_scaling = 'dynamic'\nModelConfig.rope_factor = 2.0\n")
    assert main([f"--run_dir={run_dir}", f"--out={tmp_path / 'd.gguf'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rope_scaling='dynamic'" in err and "tools.hf export" in err
    assert not (tmp_path / "d.gguf").exists()

    python = llama_cpp_python()
    if python is None:
        pytest.skip("llama-cpp-python is not installed (optional extra 'llamacpp')")
    Path(run_dir, "config.gin").write_text(
        base + "\nModelConfig.rope_scaling = 'yarn'\nModelConfig.rope_factor = 4.0\n"
        "ModelConfig.rope_original_max_len = 16\nModelConfig.rope_beta_fast = 16.0\n")
    _llama_cpp_greedy_equals_ours(load_run(run_dir), path, python)
