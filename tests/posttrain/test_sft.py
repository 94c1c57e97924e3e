"""SFT: prompt masking, packing, the chat template as tokens, vocabulary extension, bad input,
SFT and domain continued pretraining end to end from a tiny pretrained run, and 1 vs 8 devices.

Loss values are checked against a cross entropy written here in numpy over the model's logits
(an independent reference for the masked loss); the token-level expectations are hand-written
strings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from llm.config import ConfigError
from llm.data.objectives import EOS_ID
from llm.data.sources import DataError
from llm.data.tokenizer import load_tokenizer, train_sentencepiece
from llm.model import transformer
from llm.model.config import ModelConfig
from llm.posttrain import chat_data, init
from llm.serve.chat_template import ROLE_TAGS, render_chat
from llm.train.loss import decoder_loss
from tests.conftest import REPO, TINY, run_experiment

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6, of course."}]


@pytest.fixture(scope="module")
def tok(tiny_data, tmp_path_factory):
    """The tiny corpus's tokenizer with the chat tags appended."""
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    new = init.extend_tokenizer(os.path.join(tiny_data, "tokenizer.model"), path, ROLE_TAGS)
    base = load_tokenizer(os.path.join(tiny_data, "tokenizer.model")).vocab_size
    assert new == [base, base + 1, base + 2]  # appended at the top: no existing id moves
    return load_tokenizer(path)


def test_template_tokens_round_trip_and_match_the_serving_prompt(tok):
    tokens, mask = chat_data.encode_conversation(tok, CONVERSATION)
    # Every tag is one token; the text decodes back to the template's rendering (EOS ends it).
    assert [int(t) for t in tokens if t >= tok.vocab_size - 3] == \
        [tok.encode(t)[0] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|user|>",
                                    "<|assistant|>")]
    assert tokens[-1] == EOS_ID
    assert tok.decode(tokens) == render_chat(CONVERSATION, add_generation_prompt=False)
    # What a server sends before each assistant turn is exactly the training prefix.
    for k in (2, 4):
        prompt = tok.encode(render_chat(CONVERSATION[:k]))
        assert tokens[:len(prompt)].tolist() == prompt
        assert not mask[len(prompt) - 2:len(prompt)].any()  # the generation prompt: no loss
    assert not mask[:len(tok.encode(render_chat(CONVERSATION[:2])))].any()
    # Loss only on the responses, their newline and the token that ends the turn.
    runs, cur = [], []
    for t, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["4\n<|user|>", "6, of course.\n"]
    assert runs[-1][-1] == EOS_ID


def test_new_tokenizers_reserve_the_chat_tags(tmp_path):
    text = ["def f(x):\n    return x + 1\n" * 3, "Some English prose, with words.\n" * 3] * 20
    path = train_sentencepiece(text, str(tmp_path / "t.model"), vocab_size=290,
                               user_defined_symbols=list(ROLE_TAGS))
    t = load_tokenizer(path)
    assert [len(t.encode(tag)) for tag in ROLE_TAGS] == [1, 1, 1]
    assert t.encode("x<|user|>y") == [*t.encode("x"), t.encode("<|user|>")[0], *t.encode("y")]
    assert init.extend_tokenizer(path, str(tmp_path / "copy.model"), ROLE_TAGS) == []


def _batch(tok, conversations, seq_len=64, rows=4):
    examples, stats = chat_data.encode_conversations(tok, conversations, seq_len)
    ds = chat_data.chat_dataset(examples, seq_len=seq_len, global_batch_size=rows, seed=0,
                                shuffle=False, num_epochs=1)
    return list(ds), examples, stats


def test_prompt_labels_never_change_the_loss_and_it_equals_hand_masked_cross_entropy(tok):
    convs = [chat_data.Conversation(tuple(CONVERSATION[i:]), "x") for i in (0, 1, 3)]
    batch = {k: np.asarray(v) for k, v in _batch(tok, convs)[0][0].items()}
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, mlp_dim=64, attention_impl="xla")
    graphdef, params = transformer.init(cfg, jax.random.key(0))
    loss = jax.jit(decoder_loss(graphdef))
    sums = loss(params, batch)

    logits = np.asarray(jax.jit(lambda p, b: transformer.apply(
        graphdef, p, b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"]))(
            params, batch), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    target_logp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < (batch["segment_ids"] > 0).sum()
    np.testing.assert_allclose(float(sums["nll"]), -(target_logp * mask).sum(), rtol=1e-5)
    assert float(sums["tokens"]) == mask.sum()

    rng = np.random.default_rng(0)
    prompt = np.argwhere((mask == 0) & (batch["segment_ids"] > 0))
    for b, t in prompt[rng.choice(len(prompt), 4, replace=False)]:
        changed = {**batch, "targets": batch["targets"].copy()}
        changed["targets"][b, t] = (batch["targets"][b, t] + 7) % tok.vocab_size
        assert float(loss(params, changed)["nll"]) == float(sums["nll"])
    b, t = np.argwhere(mask == 1)[0]  # a response label does change it
    changed = {**batch, "targets": batch["targets"].copy()}
    changed["targets"][b, t] = (batch["targets"][b, t] + 7) % tok.vocab_size
    assert float(loss(params, changed)["nll"]) != float(sums["nll"])


def test_packing_keeps_every_conversation_whole_with_segment_ids(tok):
    convs = [chat_data.Conversation(tuple(CONVERSATION[i:i + 3]), str(i)) for i in range(3)]
    convs = [c for c in convs if any(m["role"] == "assistant" for m in c.messages)] * 5
    batches, examples, stats = _batch(tok, convs, seq_len=48, rows=4)
    assert stats.conversations == len(convs) and stats.truncated == 0
    seen = []
    for batch in batches:
        for row in range(4):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            n = int((seg > 0).sum())
            assert (seg[n:] == 0).all() and (batch["loss_mask"][row][n:] == 0).all()
            for s in range(1, int(seg.max()) + 1):
                idx = np.flatnonzero(seg == s)
                assert (np.diff(idx) == 1).all()  # contiguous
                assert pos[idx].tolist() == list(range(len(idx)))  # positions restart
                tgt = batch["targets"][row][idx]
                assert batch["inputs"][row][idx].tolist() == [0, *tgt[:-1].tolist()]
                seen.append((tuple(tgt.tolist()), tuple(batch["loss_mask"][row][idx].tolist())))
    expected = [(tuple(e["targets"].tolist()), tuple(e["loss_mask"].tolist())) for e in examples]
    assert sorted(seen) == sorted(expected)  # each conversation exactly once, never split
    assert sum(float(b["loss_mask"].sum()) for b in batches) == stats.response_tokens


def test_long_conversations_are_cut_and_counted(tok):
    long = chat_data.Conversation(({"role": "user", "content": "word " * 200},
                                   {"role": "assistant", "content": "ok"}), "x")
    examples, stats = chat_data.encode_conversations(tok, [long], seq_len=32)
    assert stats.truncated == 1 and len(examples[0]["targets"]) == 32


def test_extended_rows_are_the_mean_of_the_existing_ones():
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    head = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = init.extend_params({"embed": {"embedding": emb}, "lm_head": {"kernel": head}}, 2)
    np.testing.assert_array_equal(out["embed"]["embedding"][4:], [[4.5, 5.5, 6.5]] * 2)
    np.testing.assert_array_equal(out["lm_head"]["kernel"][:, 4:], [[1.5, 1.5], [5.5, 5.5]])
    np.testing.assert_array_equal(out["embed"]["embedding"][:4], emb)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role must be one of"),
    ('{"messages": [{"role": "user", "content": "hi"}', "not JSON"),
    ('{"prompt": "hi", "response": "  "}', "empty assistant response"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"text": "hi"}', "needs `messages`"),
])
def test_bad_chat_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(message)) as e:
        chat_data.read_chat_jsonl(str(path))
    assert str(e.value).startswith(f"{path}:3: ")


def test_vocabulary_mismatch_names_both(tiny_data, tok):
    with pytest.raises(ConfigError, match=r"does not match data_dir .*prepare.tokenizer_model"):
        init.check_vocabulary("runs/base", tok.model_path, tiny_data,
                              os.path.join(tiny_data, "tokenizer.model"))


def _read(*path: str):
    with open(os.path.join(*path)) as f:
        return list(f) if path[-1].endswith(".jsonl") else json.loads(f.read())


def _sft_args(base: str, run_dir: str, *extra: str) -> list[str]:
    return ["--gin_file=gin_configs/debug/sft_tiny.gin", f"--gin_param=sft.init_from='{base}'",
            f"--gin_param=sft.run_dir='{run_dir}'", "--gin_param=peak_flops.per_device=1e11",
            *extra]


def test_sft_from_a_pretrained_run_dir_end_to_end(tiny_run, tmp_path):
    run_dir = str(tmp_path / "sft")
    proc = run_experiment("experiments.sft", _sft_args(tiny_run, run_dir))
    for name in ("manifest.json", "config.gin", "metrics.jsonl", "eval.json", "tokenizer.model",
                 "plots/loss.png", "tb", "checkpoints"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert "base task score addition" in proc.stdout
    metrics = [json.loads(x) for x in _read(run_dir, "metrics.jsonl")]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1  # response-token loss falls
    result = _read(run_dir, "eval.json")
    assert "addition" in result["task_score"]
    assert 0 < result["loss"] < result["base"]["loss"]  # validation response loss falls
    manifest = _read(run_dir, "manifest.json")
    assert manifest["objective"] == "sft"
    assert manifest["init_from"]["run_dir"] == os.path.abspath(tiny_run)

    from llm.runs import load_run  # the SFT run dir is a normal run dir
    base, run = load_run(tiny_run), load_run(run_dir)
    assert run.cfg.vocab_size == base.cfg.vocab_size + 3
    assert run.cfg.d_model == base.cfg.d_model and run.step == 6
    assert [len(run.tokenizer.encode(t)) for t in ROLE_TAGS] == [1, 1, 1]


def test_sft_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "beep"}]}\n')
    proc = run_experiment("experiments.sft", _sft_args(
        tiny_run, str(tmp_path / "r1"), "--gin_param=sft.tasks=[]",
        f"--gin_param=sft.train_data='{bad}'"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"sft: error: {bad}:1: messages[0].role must be one of system, user, assistant, got "
        "'robot'."]


def test_sft_shape_mismatch_names_both(tiny_run, tmp_path, capsys):
    from experiments import sft
    gin.clear_config()
    try:
        assert sft.main(_sft_args(tiny_run, str(tmp_path / "r"),
                                  "--gin_param=ModelConfig.d_model=32")) == 2
    finally:
        gin.clear_config()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ModelConfig.d_model=32 does not match the base run" in err[0]
    assert "(ModelConfig.d_model=64)" in err[0]


def test_domain_pretraining_starts_from_the_run_weights(tiny_data, tiny_run, tmp_path):
    run_dir = str(tmp_path / "domain")
    run_experiment("experiments.pretrain_ntp", [
        *TINY, f"--gin_param=pretrain.data_dir='{tiny_data}'",
        f"--gin_param=pretrain.run_dir='{run_dir}'", "--gin_param=pretrain.sample_prompt=''",
        f"--gin_param=pretrain.init_from='{tiny_run}'",
        "--gin_param=pretrain.init_optimizer='restored'", "--gin_param=TrainConfig.steps=2",
        "--gin_param=peak_flops.per_device=1e11"])
    fresh = [json.loads(x) for x in _read(tiny_run, "metrics.jsonl")]
    tuned = [json.loads(x) for x in _read(run_dir, "metrics.jsonl")]
    # Step 1 of the same batches: the base run started at ~ln(512); this run at the base's level.
    assert tuned[0]["loss"] < fresh[0]["loss"] - 0.5
    assert abs(tuned[0]["loss"] - fresh[-1]["loss"]) < 0.3
    manifest = _read(run_dir, "manifest.json")
    assert manifest["init_from"]["optimizer"] == "restored"
    # tools.bits_per_byte (the domain/general comparison) reads the run back through load_run
    # and scores the same rows as the run's own final validation pass.
    from tools.bits_per_byte import bits_per_byte
    np.testing.assert_allclose(bits_per_byte(run_dir, tiny_data)["bits_per_byte"],
                               _read(run_dir, "eval.json")["bits_per_byte"], rtol=1e-5)


@pytest.mark.slow
def test_sft_step_on_8_devices_matches_1_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": REPO}
    # fsdp_tp shards the weights 8 ways over FSDP x TP (the worker checks they really split).
    proc = subprocess.run([sys.executable, "-m", "tests.posttrain.sft_sharding_worker", "single",
                           "gin_configs/mesh/fsdp_tp.gin"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    single = out.pop("single")
    assert single["losses"][-1] < single["losses"][0]
    for mesh, r in out.items():
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=0, atol=1e-5, err_msg=mesh)
        np.testing.assert_allclose(r["params"], single["params"], rtol=0, atol=1e-5,
                                   err_msg=mesh)


def test_chat_iterator_resumes_exactly_from_its_json_state(tok):
    convs = [chat_data.Conversation(tuple(CONVERSATION[i:i + 3]), str(i)) for i in range(3)] * 7
    convs = [c for c in convs if any(m["role"] == "assistant" for m in c.messages)]
    examples, _ = chat_data.encode_conversations(tok, convs, 48)
    ds = chat_data.chat_dataset(examples, seq_len=48, global_batch_size=4, seed=3)
    it = iter(ds)
    for _ in range(5):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as grain.checkpoint stores it
    want = [next(it) for _ in range(6)]
    resumed = iter(ds)
    resumed.set_state(state)
    for a in want:
        b = next(resumed)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
