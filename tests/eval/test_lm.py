"""LanguageModel on a real tiny run: lm-eval semantics against direct forward passes, batch
invariance (bitwise, fp32 on CPU), rolling windows, greedy generation, and load_run's errors."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil

import jax
import numpy as np
import pytest

from llm.config import ConfigError
from llm.data.sources import DataError
from llm.eval.lm import BOS_ID, LanguageModel, PromptTooLong, rolling_windows
from llm.model import transformer
from llm.runs import load_run

REQUESTS = [("def foo(x):\n    return", " x"), ("import os", "\nimport sys"),
            ("", "hello world"), ("class A:", "\n    pass\n"), ("a" * 10, " b" * 8),
            ("The email package ", "is"), ("x = ", "1"),
            ("from email import utils\n" * 2, "def parse(s):\n    return s\n")]


@pytest.fixture(scope="module")
def lm(tiny_run):
    return LanguageModel.from_run_dir(tiny_run, batch_size=4, progress=False)


@functools.cache
def _apply(graphdef):
    return jax.jit(lambda params, ids: jax.nn.log_softmax(
        transformer.apply(graphdef, params, ids).astype(np.float32), axis=-1))


def reference_logp(lm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] log-probabilities of the next token after each prefix of `ids`: one
    plain forward pass of the row right-padded to max_length (causal, so the padding after a
    position cannot change it), no buckets, no lax.map -- the reference."""
    padded = np.zeros((1, lm.max_length), np.int32)
    padded[0, : len(ids)] = ids
    return np.asarray(_apply(lm.run.graphdef)(lm.run.params, padded))[0, : len(ids)]


def direct_logprobs(lm, tokens: list[int]) -> np.ndarray:
    """log p(tokens[i] | BOS, tokens[:i])."""
    logp = reference_logp(lm, [BOS_ID, *tokens[:-1]])
    return logp[np.arange(len(tokens)), tokens]


def test_loglikelihood_matches_direct_forward(lm):
    out = lm.loglikelihood(REQUESTS)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, out):
        # lm-eval's pair encoding: trailing context spaces move to the continuation.
        stripped = context.rstrip()
        moved = context[len(stripped):] + continuation
        ctx = lm.tokenizer.encode(stripped)
        cont = lm.tokenizer.encode(stripped + moved)[len(ctx):]
        ref = direct_logprobs(lm, ctx + cont)[len(ctx):]
        assert ll == pytest.approx(float(ref.sum()), abs=1e-4)
        assert isinstance(greedy, bool)


def test_batch_size_and_order_do_not_change_results(lm):
    texts = ["".join(r) * 3 for r in REQUESTS]
    ref_ll, ref_roll = None, None
    for batch in (1, 4, 7):
        lm.batch_size = batch
        ll, roll = lm.loglikelihood(REQUESTS), lm.loglikelihood_rolling(texts)
        if ref_ll is None:
            ref_ll, ref_roll = ll, roll
        assert ll == ref_ll and roll == ref_roll  # bitwise: floats compared with ==
    perm = list(range(len(REQUESTS)))
    random.Random(0).shuffle(perm)
    shuffled = lm.loglikelihood([REQUESTS[i] for i in perm])
    assert shuffled == [ref_ll[i] for i in perm]
    lm.batch_size = 4


def test_rolling_windows_score_every_token_once():
    tokens = list(range(3, 3 + 150))
    windows = rolling_windows(tokens, 64)
    scored = [t for _, targets in windows for t in targets]
    assert scored == tokens
    for ctx, targets in windows:
        assert len(ctx) + len(targets) - 1 <= 64  # tokens the model reads
    # the last window predicts 150 - 128 = 22 tokens and keeps a full 64-token context
    ctx, targets = windows[-1]
    assert len(targets) == 22 and len(ctx) + len(targets) - 1 == 64
    assert windows[0][0] == [BOS_ID]


def test_rolling_equals_direct_sum(lm):
    short = "def f(x):\n    return x\n"
    assert len(lm.tokenizer.encode(short)) < lm.max_length
    (roll,) = lm.loglikelihood_rolling([short])
    ref = direct_logprobs(lm, lm.tokenizer.encode(short)).sum()
    assert roll == pytest.approx(float(ref), abs=1e-4)
    long = "import os\nimport sys\n" * 30
    tokens = lm.tokenizer.encode(long)
    assert len(tokens) > 2 * lm.max_length
    expected = 0.0
    for ctx, targets in rolling_windows(tokens, lm.max_length):
        seq = ctx + targets
        logp = reference_logp(lm, seq[:-1])
        pos = np.arange(len(seq) - 1 - len(targets), len(seq) - 1)
        expected += float(logp[pos, seq[len(seq) - len(targets):]].sum())
    assert lm.loglikelihood_rolling([long])[0] == pytest.approx(expected, abs=1e-3)


def test_greedy_generation_matches_argmax_reference(lm):
    prompts = ["def ", "import", "class Message"]
    out = lm.generate_until([(p, {"max_gen_toks": 6}) for p in prompts])
    for p, text in zip(prompts, out):
        seq = [BOS_ID, *lm.tokenizer.encode(p)]
        new = []
        for _ in range(6):  # no KV cache: a full forward pass per token
            tok = int(np.argmax(reference_logp(lm, seq)[-1]))
            if tok == 1:
                break
            seq.append(tok)
            new.append(tok)
        assert text == lm.tokenizer.decode(new)
    lm.batch_size = 1
    assert lm.generate_until([(p, {"max_gen_toks": 6}) for p in prompts]) == out
    sampled = [(p, {"max_gen_toks": 6, "temperature": 1.0, "seed": 5}) for p in prompts]
    first = lm.generate_until(sampled)
    lm.batch_size = 7
    assert lm.generate_until(sampled[::-1]) == first[::-1]
    lm.batch_size = 4
    # stop strings cut the text before the first occurrence
    cut = lm.generate_until([("def ", {"max_gen_toks": 6, "until": [out[0][2:4]]})])[0]
    assert out[0].startswith(cut) and len(cut) <= 2


def test_prompt_longer_than_context(lm):
    with pytest.raises(PromptTooLong, match="request 0: .* exceed the model's context of 64"):
        lm.loglikelihood([("x " * 200, " y")])
    lm.truncate = True
    assert len(lm.loglikelihood([("x " * 200, " y")])) == 1
    lm.truncate = False


def test_load_run_errors(tiny_run, tmp_path):
    with pytest.raises(DataError, match="is not a run directory"):
        load_run(str(tmp_path))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("manifest.json", "config.gin"):
        shutil.copy(os.path.join(tiny_run, f), bare / f)
    with pytest.raises(DataError, match="has no checkpoint"):
        load_run(str(bare))
    with pytest.raises(DataError, match=r"no checkpoint at step 5; available steps: 6, 9, 12"):
        load_run(tiny_run, step=5)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["objective"] = "span_corruption"
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="supports? decoder-only runs"):
        load_run(str(bare))
    run = load_run(tiny_run, step=9)
    assert run.step == 9 and run.cfg.d_model == 64 and run.seq_len == 64
