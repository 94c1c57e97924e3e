"""Hugging Face interop against transformers itself (CPU, fp32, randomly initialised models built
from a config; nothing is downloaded).

Reference: transformers' LlamaForCausalLM / GPT2LMHeadModel forward and `generate`."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from llm.interop import hf  # noqa: E402
from llm.runs import load_run  # noqa: E402
from llm.serve.sampler import generate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMAIL = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "email", "*.py")))
VOCAB = 512


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    from llm.data.tokenizer import train_sentencepiece

    path = str(tmp_path_factory.mktemp("spm") / "spm.model")
    return train_sentencepiece([Path(p).read_text() for p in EMAIL], path, vocab_size=VOCAB)


def _byte_bpe(kind: str, out: str):
    """A byte-level BPE tokenizer.json trained here with `tokenizers` on the stdlib email
    package (~400 ids, fewer than the model's VOCAB rows: a padded vocabulary), saved as the
    hub saves one: "gpt2" -- GPT2TokenizerFast, <|endoftext|> is bos/eos/unk, no pad, nothing
    added by the post-processor; "llama3" -- Llama-3's layout: <|begin_of_text|> (bos, added by
    a TemplateProcessing post-processor), <|end_of_text|> (eos) and reserved specials as added
    tokens after the BPE ids (not in the model's vocabulary), no pad, no unk. Built by
    tools/make_bpe_hf_dirs.py's `byte_bpe`."""
    from tools.make_bpe_hf_dirs import byte_bpe

    lines = [line for p in EMAIL for line in Path(p).read_text().splitlines() if line.strip()]
    fast = byte_bpe(kind, lines[:600], vocab_size=400, reserved=3)
    fast.save_pretrained(out)
    return fast


def _llama(tie: bool, eos: int = 1, bos: int | None = None, pad: int | None = 0):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tie, eos_token_id=eos,
        pad_token_id=pad, bos_token_id=bos)
    model = transformers.LlamaForCausalLM(config)
    # Random init is tiny (std 0.02); widen it so attention and the logits are not near-uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def _gpt2(eos: int = 1, bos: int | None = None, pad: int | None = 0):
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=128, eos_token_id=eos, pad_token_id=pad,
                                     bos_token_id=bos)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.ndim == 2 else 0.05)
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f.w" in name:
                p.add_(1.0)
    return model.eval()


def _save(model, spm_model: str, out: str) -> str:
    model.save_pretrained(out, safe_serialization=True)
    import shutil

    shutil.copyfile(spm_model, os.path.join(out, "tokenizer.model"))
    return out


def _our_logits(run, ids: np.ndarray) -> np.ndarray:
    from llm.model import transformer

    return np.asarray(transformer.apply(run.graphdef, run.params, ids))


def _check_parity(model, run, seed: int, ours_of: np.ndarray | None = None) -> list[int]:
    """Logits and 32 greedy tokens against transformers on random source ids; `ours_of[i]` is
    our id of source id i (a relabelled import), identity by default. Returns our tokens."""
    ours_of = np.arange(VOCAB) if ours_of is None else ours_of
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = _our_logits(run, ours_of[ids].astype(np.int32))[..., ours_of]  # source id order
    assert ours.shape == theirs.shape
    assert np.abs(ours).max() > 1.0  # the check is not vacuous
    diff = np.abs(ours - theirs).max()
    assert diff <= 1e-4, diff
    # Greedy decoding, 32 new tokens, EOS disabled on both sides.
    prompt = ids[0, :8]
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt[None].astype(np.int64)), do_sample=False,
                             max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                             pad_token_id=0)
    theirs_tokens = ours_of[out[0, len(prompt):].numpy()].tolist()
    ours_tokens = generate(run.graphdef, run.params, run.cfg, [ours_of[prompt].tolist()],
                           max_new_tokens=32, temperature=0.0, eos_id=-1)[0]
    assert len(theirs_tokens) == 32 and ours_tokens == theirs_tokens
    return ours_tokens


TEXTS = ["def f(x):\n    return x + 1\n", "héllo  wörld 😀\t x  \n\n   ", "  lead", "trail  ",
         "From: a@b.c\r\nSubject: \u00e9t\u00e9 \u4e2d\u6587", " " * 9 + "\t\t\n" * 3]


@pytest.mark.parametrize("arch", ["llama_gqa_untied_llama3tok", "gpt2_bytebpe"])
def test_import_parity_and_round_trip(arch, tmp_path, capsys):
    """Hub-style directories whose tokenizer is only a tokenizer.json (byte-level BPE: GPT-2's
    layout, and Llama-3's with a BOS-adding post-processor), imported through the CLI: our ids
    are AutoTokenizer's relabelled (pad/unk rows added, eos moved to 1), logits on the source's
    ids <= 1e-4, 32 greedy tokens equal, the run decodes, and export gives back the source's
    weights and tokenizer files bit for bit."""
    from tools.hf import main

    src = str(tmp_path / "hf")
    fast = _byte_bpe("llama3" if arch.startswith("llama") else "gpt2", src)
    eos, bos = fast.eos_token_id, fast.bos_token_id
    model = _llama(tie=False, eos=eos, bos=bos, pad=None) if arch.startswith("llama") else \
        _gpt2(eos=eos, bos=bos, pad=None)
    model.save_pretrained(src)
    run_dir = str(tmp_path / "run")
    assert main(["import", f"--hf_dir={src}", f"--run_dir={run_dir}"]) == 0, capsys.readouterr()
    run = load_run(run_dir)
    if arch.startswith("llama"):
        assert (run.cfg.num_heads, run.cfg.kv_heads, run.cfg.tie_embeddings) == (4, 2, False)
    source = run.manifest["imported_from"]
    perm = source["token_permutation"]
    # Neither has an unk of its own (GPT-2's is its eos): a row is appended for it. Id 0, the
    # BOS this repo feeds at position 0, is Llama-3's <|begin_of_text|>; GPT-2 has no BOS of
    # its own (bos = eos), so id 0 is an appended pad row.
    added = 1 if arch.startswith("llama") else 2
    assert source["added_vocab_rows"] == added and run.cfg.vocab_size == VOCAB + added
    assert perm[:3] == ([bos, eos, VOCAB] if added == 1 else [VOCAB, eos, VOCAB + 1])
    assert sorted(perm) == list(range(VOCAB + added))
    ours_of = np.argsort(perm)[:VOCAB]
    tok = run.tokenizer
    assert type(tok).__name__ == "HFTokenizer" and tok.vocab_size == len(fast) + added
    assert (tok.id_to_piece(0), tok.id_to_piece(1), tok.id_to_piece(2)) == \
        ("<|begin_of_text|>" if added == 1 else "<llm_pad>", fast.eos_token, "<llm_unk>")
    auto = transformers.AutoTokenizer.from_pretrained(src)
    for text in TEXTS + [Path(EMAIL[0]).read_text()[:2000]]:
        theirs = ours_of[auto.encode(text)].tolist()
        # What the model reads: transformers' ids == ours after the BOS every consumer here
        # puts in front (Llama-3's post-processor adds it; GPT-2 has none to add).
        if arch.startswith("llama"):
            assert theirs == [0] + tok.encode(text), text
        else:
            assert theirs == tok.encode(text), text
        assert tok.decode(tok.encode(text)) == auto.decode(auto.encode(text),
                                                           skip_special_tokens=True)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    with pytest.raises(hf.DataError, match="tokenizer.json; seqio"):
        tok.to_seqio()
    import pickle

    from llm.data.tokenizer import load_tokenizer

    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[1]) == tok.encode(TEXTS[1])  # workers
    with pytest.raises(hf.DataError, match="not special pad/eos/unk tokens"):
        load_tokenizer(os.path.join(src, "tokenizer.json"))  # the source's, not relabelled
    with pytest.raises(hf.DataError, match="no seqio extra ids"):
        load_tokenizer(tok.model_path, extra_ids=4)

    greedy = _check_parity(model, run, seed=0, ours_of=ours_of)
    # The imported run serves: decode of the greedy tokens is transformers' decode of its own.
    theirs_ids = [perm[i] for i in greedy]
    theirs_ids = theirs_ids[:theirs_ids.index(eos)] if eos in theirs_ids else theirs_ids
    assert tok.decode(greedy) == auto.decode(theirs_ids, skip_special_tokens=True)
    prompt = tok.encode("def f(x):")
    out = generate(run.graphdef, run.params, run.cfg, [prompt], max_new_tokens=8,
                   temperature=0.0, eos_id=tok.eos_id)[0]
    assert 0 < len(out) <= 8 and isinstance(tok.decode(out), str)
    if arch.startswith("llama"):
        # The evaluator (BOS_ID + ids, as every stage feeds the model) against transformers on
        # AutoTokenizer's ids (BOS from its post-processor); the reference softmax also covers
        # the appended unk row, whose untied head column is the mean column: its logit is the
        # mean of the real logits.
        from llm.eval.lm import LanguageModel

        ctx, cont = "def f(x):", "\n    return x + 1"
        full = auto.encode(ctx + cont)
        n = len(full) - len(auto.encode(ctx))
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].double()
        logits = torch.cat([logits, logits.mean(-1, keepdim=True)], -1)
        ref = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(full[1:])[:, None])
        lm = LanguageModel(run, batch_size=1, progress=False)
        [(ll, _)] = lm.loglikelihood([(ctx, cont)])
        assert abs(ll - float(ref[-n:].sum())) <= 1e-4 * n, (ll, float(ref[-n:].sum()))
        # A merge across the boundary ("x(" + "(" -> "x", "((") leaves no continuation tokens
        # in context+continuation: the continuation's own tokens are scored instead.
        merged = next(t for t in auto.get_vocab() if len(t) == 2 and t.isascii() and
                      t[0] not in " \n" and len(tok.encode("\n" + t)) == 2 ==
                      len(tok.encode("\n" + t[0])))
        ctx2 = "\n" + merged[0]
        assert lm.encode_pair(ctx2, merged[1]) == (tok.encode(ctx2), tok.encode(merged[1]))
        assert lm.loglikelihood([(ctx2, merged[1])])[0][0] < 0
    # SFT's chat tags: appended as whole added tokens after the last id, kept when decoding.
    from llm.posttrain.init import extend_tokenizer
    from llm.serve.chat_template import ROLE_TAGS

    new_ids = extend_tokenizer(tok.model_path, str(tmp_path / "sft.model"), ROLE_TAGS)
    assert new_ids == list(range(tok.vocab_size, tok.vocab_size + len(ROLE_TAGS)))
    sft_tok = load_tokenizer(str(tmp_path / "sft.model"))
    text = f"{ROLE_TAGS[1]}hi\n{ROLE_TAGS[2]}"
    assert sft_tok.encode(text) == [new_ids[1], *tok.encode("hi\n"), new_ids[2]]
    assert sft_tok.decode(sft_tok.encode(text)) == text
    # A run fine-tuned from the import (no `imported_from`, the tagged tokenizer) exports in
    # our ids: AutoTokenizer on the export gives the run's ids.
    import shutil

    tuned = str(tmp_path / "tuned")
    shutil.copytree(run_dir, tuned, ignore=shutil.ignore_patterns("hf_source"))
    manifest = json.loads(Path(tuned, "manifest.json").read_text())
    del manifest["imported_from"]
    Path(tuned, "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(tmp_path / "sft.model", Path(tuned, "tokenizer.json"))
    assert main(["export", f"--run_dir={tuned}", f"--out={tmp_path / 'tuned_hf'}"]) == 0
    tuned_auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tuned_hf"))
    for t in [text] + TEXTS:
        assert tuned_auto(t, add_special_tokens=False)["input_ids"] == sft_tok.encode(t)

    # Round trip: import then export is bit-exact on every tensor, and nothing is added/lost;
    # the source's tokenizer files come back unchanged.
    out = str(tmp_path / "exported")
    assert main(["export", f"--run_dir={run_dir}", f"--out={out}"]) == 0
    original = {k: v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert set(exported) == set(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert Path(out, name).read_bytes() == Path(src, name).read_bytes(), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model) and reloaded.config.vocab_size == VOCAB


def test_export_trained_run_loads_in_transformers(tiny_run, tmp_path):
    """A run trained by this repo (LLaMA-style, GQA, tied): transformers loads the export with
    Auto classes, its logits match ours, and AutoTokenizer gives our ids on the corpus."""
    out = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-m", "tools.hf", "export", f"--run_dir={tiny_run}",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "tokenizer.model"):
        assert os.path.isfile(os.path.join(out, name)), name
    run = load_run(tiny_run)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == run.cfg.kv_heads < run.cfg.num_heads
    _check_parity(model, run, seed=1)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 0, 2)
    texts = [Path(p).read_text() for p in EMAIL] + ["héllo  wörld 😀\t x  ", "  lead", "trail  "]
    for text in texts:
        ids = run.tokenizer.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == run.tokenizer.decode(ids)


def _cli_import(hf_dir: str, run_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.hf", "import", f"--hf_dir={hf_dir}",
                           f"--run_dir={run_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_import_bad_input(spm_model, tmp_path, capsys):
    src = _save(_gpt2(), spm_model, str(tmp_path / "hf"))
    config_path = os.path.join(src, "config.json")
    config = json.loads(Path(config_path).read_text())

    def check(mutated: dict, expect: str):
        Path(config_path).write_text(json.dumps(mutated))
        proc = _cli_import(src, str(tmp_path / f"run{len(os.listdir(tmp_path))}"))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], proc.stderr

    check({**config, "architectures": ["MambaForCausalLM"]}, "'MambaForCausalLM'")
    check({k: v for k, v in config.items() if k != "n_layer"}, "'n_layer'")
    check({**config, "n_embd": 96, "n_head": 4}, "'transformer.wte.weight' has shape (512, 64)")
    check({**config, "n_positions": 64}, "'transformer.wpe.weight'")
    check({**config, "n_layer": 1}, "'transformer.h.1.")  # weights the config does not use
    Path(config_path).write_text(json.dumps(config))

    # The same CLI in-process (its main), for the tokenizer and the shard index.
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tools.hf import main

    def check_main(expect: str):
        assert main(["import", f"--hf_dir={src}", f"--run_dir={tmp_path / 'r'}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err, err
        assert not os.path.exists(tmp_path / "r" / "checkpoints")

    capsys.readouterr()  # save_pretrained's progress bar
    os.remove(os.path.join(src, "tokenizer.model"))
    check_main("has neither a tokenizer.json nor a tokenizer.model")
    # tokenizer.json only: a model type import cannot relabel, ids past the weights' rows.
    Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)])).save(os.path.join(src, "tokenizer.json"))
    check_main("tokenizer model type 'Unigram' without a SentencePiece tokenizer.model")
    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "c": 600}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.save(os.path.join(src, "tokenizer.json"))
    check_main("has token id 600, but config.json vocab_size=512")
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"transformer.wte.weight": "model-00002-of-00002.safetensors"}},
                  f)
    check_main("lists shard 'model-00002-of-00002.safetensors', which is not in --hf_dir")
    os.remove(os.path.join(src, "model.safetensors.index.json"))
    # The fix the tokenizer message names: --tokenizer=PATH (here the weights' own SentencePiece).
    assert main(["import", f"--hf_dir={src}", f"--run_dir={tmp_path / 'r'}",
                 f"--tokenizer={tmp_path / 'nope.model'}"]) == 2
    assert "--tokenizer=" in capsys.readouterr().err
    assert main(["import", f"--hf_dir={src}", f"--run_dir={tmp_path / 'r'}",
                 f"--tokenizer={spm_model}"]) == 0
    assert Path(tmp_path, "r", "tokenizer.model").read_bytes() == Path(spm_model).read_bytes()


@pytest.fixture(scope="module")
def llama_hub_spm(tmp_path_factory) -> str:
    """A SentencePiece model with LLaMA's hub conventions (BPE, byte fallback, unk 0, <s> 1,
    </s> 2, no pad, a dummy prefix), trained here on the stdlib email package."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for p in EMAIL for line in Path(p).read_text().splitlines()
                               if line.strip()),
        model_writer=out, vocab_size=VOCAB, model_type="bpe", byte_fallback=True, unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("hubspm") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return str(path)


VARIANTS = {
    # LLaMA: tied, attention biases without MLP biases, bf16, sharded with an index, a LLaMA
    # hub tokenizer (special ids moved), its own generation_config.json.
    "llama_tied_attnbias_bf16_sharded_hubtok": dict(
        arch="llama", tie=True, attention_bias=True, mlp_bias=False, dtype=torch.bfloat16,
        shard="20KB", hub_tokenizer=True),
    # LLaMA untied with both biases, fp16, one file.
    "llama_untied_bias_fp16": dict(arch="llama", tie=False, attention_bias=True, mlp_bias=True,
                                   dtype=torch.float16, shard=None, hub_tokenizer=False),
    # GPT-2 untied (GPT2Config ties by default), fp16 Conv1D weights.
    "gpt2_untied_fp16": dict(arch="gpt2", tie=False, dtype=torch.float16, shard=None,
                             hub_tokenizer=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_layout_variants(variant, spm_model, llama_hub_spm, tmp_path):
    """Directories as `save_pretrained` writes them for real checkpoints: logits equal
    transformers' (the same half-precision weights, upcast to fp32 on both sides) and export
    gives back every tensor bit for bit, in the source dtype, with the source tokenizer."""
    import shutil

    import sentencepiece as spm

    v = VARIANTS[variant]
    torch.manual_seed(2)
    if v["arch"] == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=v["tie"], attention_bias=v["attention_bias"],
            mlp_bias=v["mlp_bias"], eos_token_id=2 if v["hub_tokenizer"] else 1,
            bos_token_id=1 if v["hub_tokenizer"] else None,
            pad_token_id=None if v["hub_tokenizer"] else 0)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                         n_positions=64, tie_word_embeddings=False,
                                         eos_token_id=1, pad_token_id=0, bos_token_id=None)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.ndim == 2 else 0.05)
            if name.endswith("norm.weight") or ".ln_" in name or "ln_f.w" in name:
                p.add_(1.0)
    model = model.to(v["dtype"]).eval()
    src = str(tmp_path / "hf")
    model.save_pretrained(src, max_shard_size=v["shard"] or "1GB")
    model.generation_config.temperature, model.generation_config.do_sample = 0.6, True
    model.generation_config.save_pretrained(src)
    shutil.copyfile(llama_hub_spm if v["hub_tokenizer"] else spm_model,
                    os.path.join(src, "tokenizer.model"))
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json")) == bool(v["shard"])
    run_dir = str(tmp_path / "run")
    hf.import_hf(src, run_dir)
    run = load_run(run_dir)
    assert run.cfg.tie_embeddings == v["tie"]

    # Token ids: the run's tokenizer gives the source's ids relabelled by the recorded map.
    source = run.manifest["imported_from"]
    perm = source["token_permutation"]
    if v["hub_tokenizer"]:
        assert perm[:3] == [1, 2, 0] and perm[3:] == list(range(3, VOCAB))
        theirs_sp = spm.SentencePieceProcessor(model_file=llama_hub_spm)
        text = Path(EMAIL[0]).read_text()[:3000]
        inv = np.argsort(perm)
        assert run.tokenizer.encode(text) == [int(inv[i]) for i in theirs_sp.encode(text)]
        assert run.tokenizer.id_to_piece(0) == "<s>" and run.tokenizer.id_to_piece(1) == "</s>"
    else:
        assert perm is None
        perm = list(range(VOCAB))

    # Reference: transformers loading the directory in fp32 (a cast model would keep its RoPE
    # inv_freq buffer rounded to half precision).
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(3, VOCAB, size=(2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = _our_logits(run, np.argsort(perm)[ids].astype(np.int32))
    assert np.abs(ours).max() > 1.0
    assert np.abs(ours - theirs[..., perm]).max() <= 1e-4

    out = str(tmp_path / "exported")
    hf.export_run(run_dir, out, max_shard_bytes=20_000 if v["shard"] else None)
    original = hf.read_hf_dir(src)[1]
    config_out, exported = hf.read_hf_dir(out)
    assert set(exported) == set(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    if v["shard"]:
        index = json.loads(Path(out, "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == \
            set(original)
    assert Path(out, "generation_config.json").read_text() == \
        Path(src, "generation_config.json").read_text()
    assert Path(out, "tokenizer.model").read_bytes() == Path(src, "tokenizer.model").read_bytes()
    for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias",
                "mlp_bias"):
        assert config_out.get(key) == model.config.to_dict().get(key), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == v["dtype"]


def _viterbi_exact(text: str, scores: dict[str, float]) -> list[str]:
    """Reference unigram segmentation in exact rational arithmetic, the loop that both
    SentencePiece (EncodeOptimized) and tokenizers (encode_optimized) run: forward over start
    positions, pieces shortest first, a candidate replaces only if strictly greater."""
    from fractions import Fraction

    best: dict[int, tuple[Fraction, int, str]] = {0: (Fraction(0), -1, "")}
    longest = max(map(len, scores))
    for start in range(len(text)):
        for end in range(start + 1, min(len(text), start + longest) + 1):
            piece = text[start:end]
            if piece in scores:
                cand = best[start][0] + Fraction(scores[piece])
                if end not in best or cand > best[end][0]:
                    best[end] = (cand, start, piece)
    out, end = [], len(text)
    while end:
        _, end, piece = best[end]
        out.append(piece)
    return out[::-1]


def test_hf_tokenizer_breaks_score_ties_as_sentencepiece(spm_model, tmp_path):
    """Equal-score segmentations (a run of '=' over pieces '=', '==', '===') are where
    SentencePiece's float32 Viterbi and tokenizers' float64 one disagree. With scores on the
    2^-3 grid (`quantize_scores`, applied by train_sentencepiece) both equal the exact-arithmetic
    reference; with unrounded scores they do not (so this test can fail)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from llm.data.tokenizer import SCORE_BITS, load_tokenizer, quantize_scores
    from tools.hf_tokenizer_check import main as check_main
    from tools.hf_tokenizer_check import stress_texts

    assert check_main([]) == 2  # neither --run_dir nor --tokenizer: one line, exit 2
    assert check_main([f"--tokenizer={tmp_path / 'missing.model'}"]) == 2

    trained = pb.ModelProto.FromString(Path(spm_model).read_bytes())
    # train_sentencepiece rounds every score: all are multiples of 1/8.
    assert all((p.score * 2**SCORE_BITS).is_integer() for p in trained.pieces)
    assert len({p.score for p in trained.pieces}) > 20  # and still distinguishes pieces
    # A hand-made model: the trained one's pad/eos/unk and 256 byte pieces, then four pieces.
    model = pb.ModelProto.FromString(trained.SerializeToString())
    del model.pieces[259:]
    raw = {"x": -4.1, "=": -3.3, "==": -5.7, "===": float(np.float32(-3.3) + np.float32(-5.7))}
    for piece, score in raw.items():
        model.pieces.add(piece=piece, score=score, type=pb.ModelProto.SentencePiece.NORMAL)
    text = "x" * 100 + "=" * 7

    def both(proto: bytes, name: str):
        out = tmp_path / name
        out.mkdir()
        (out / "spm.model").write_bytes(proto)
        ours = load_tokenizer(str(out / "spm.model"))
        hf.hf_tokenizer(str(out / "spm.model")).save_pretrained(str(out))
        theirs = transformers.AutoTokenizer.from_pretrained(str(out))
        return ours, theirs

    ours, theirs = both(model.SerializeToString(), "raw")
    assert ours.encode(text) != theirs(text, add_special_tokens=False)["input_ids"]

    ours, theirs = both(quantize_scores(model.SerializeToString()), "rounded")
    rounded = {k: round(v * 8) / 8 for k, v in raw.items()}  # -4.125, -3.25, -5.75, -9.0
    for t in (text, "=" * 5000, "x=" * 300 + "=" * 4097):
        ids = ours.encode(t)
        assert [ours.id_to_piece(i) for i in ids] == _viterbi_exact(t, rounded)
        assert theirs(t, add_special_tokens=False)["input_ids"] == ids
    # The trained (rounded) model: runs of one character, random Unicode and Latin-1 bytes.
    ours, theirs = load_tokenizer(spm_model), both(Path(spm_model).read_bytes(), "trained")[1]
    for t in stress_texts():
        ids = ours.encode(t)
        assert theirs(t, add_special_tokens=False)["input_ids"] == ids
        assert ours.decode(ids) == t
