"""The continuous-batching engine against independent references: the plain batch sampler (greedy
tokens), a full forward pass and the evaluator (logprobs), hand-computed filter supports
(sampling), and itself run alone vs. batched (seeded sampling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import transformer
from llm.runs import load_run
from llm.serve.engine import BOS_ID, Engine, EngineConfig, SamplingParams, sample_tokens
from llm.serve.sampler import generate

PROMPTS = ["def f(x):\n    return", "import os", "class Message:\n    def __init__(self, "
           "payload, headers):\n        self.payload = payload\n", "x", "# Copyright (C) 2001 "
           "Python Software Foundation\n\"\"\"Email package.\"\"\"\n"]


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


def _engine(run, **kw) -> Engine:
    cfg = dict(slots=4, chunk_size=16, min_chunk=8, max_context=128)
    cfg.update(kw)
    return Engine(run.graphdef, run.params, run.cfg, run.tokenizer, EngineConfig(**cfg))


def test_greedy_equals_plain_sampler_across_chunks(run):
    """6 prompts (some longer than a 16-token chunk) in 4 slots: greedy tokens equal the batch
    sampler's, which prefills in one pass and decodes in lockstep."""
    engine = _engine(run)
    prompts = [run.tokenizer.encode(p) for p in PROMPTS] + [list(range(5, 40))]
    reqs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                                                   ignore_eos=True))
    ref = generate(run.graphdef, run.params, run.cfg, [[BOS_ID, *p] for p in prompts],
                   max_new_tokens=12, temperature=0.0, top_k=0, eos_id=-1)
    assert any(len(p) > 16 for p in prompts)
    assert [r.output for r in reqs] == ref
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.active_slots() == 0 and engine.queue_depth() == 0


def test_logprobs_equal_full_forward_and_evaluator(run):
    """Echoed prompt logprobs + generated-token logprobs equal log_softmax of one full forward
    pass, and the continuation sums equal LanguageModel.loglikelihood, within 1e-5 (fp32)."""
    from llm.eval.lm import LanguageModel

    engine = _engine(run)
    prompt = run.tokenizer.encode(PROMPTS[2])
    [req] = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=3,
                                                     echo=True, ignore_eos=True))
    seq = [BOS_ID, *prompt, *req.output]
    logp = jax.nn.log_softmax(transformer.apply(run.graphdef, run.params,
                                                jnp.asarray([seq[:-1]]))[0], axis=-1)
    ref = np.asarray(logp)[np.arange(len(seq) - 1), seq[1:]]
    got = [e.logprob for e in req.prompt_logprobs] + [e.logprob for e in req.logprobs]
    assert len(got) == len(ref)
    assert all(type(x) is float for x in got[1:])  # JSON-serialisable, not numpy scalars
    np.testing.assert_allclose(got, ref, atol=1e-5)
    top = [t for t, _ in req.logprobs[0].top]
    assert top == np.argsort(-np.asarray(logp)[len(prompt)])[:3].tolist()

    lm = LanguageModel(run, batch_size=2, progress=False)
    pairs = [("def f(x):\n    return", " x + 1"), ("import", " os\nimport sys"),
             ("class A:", "\n    pass")]
    expected = lm.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, expected):
        c, t = lm.encode_pair(ctx, cont)
        [r] = engine.generate([c + t], SamplingParams(max_tokens=0, logprobs=1, echo=True))
        mine = r.prompt_logprobs[len(c):]
        assert abs(sum(e.logprob for e in mine) - ll) < 1e-5
        assert all(e.top[0][0] == e.token_id for e in mine) == greedy


def test_seeded_request_same_tokens_alone_or_among_15(run):
    """A seeded sampled request gives the same tokens alone and in the middle of 15 others with
    other lengths and parameters (it lands in another slot, prefill interleaves with decode)."""
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=1234,
                            ignore_eos=True)
    target = run.tokenizer.encode(PROMPTS[0])
    alone = _engine(run).generate([target], params)[0].output

    engine = _engine(run)
    rng = np.random.default_rng(0)
    others = []
    for i in range(15):
        p = run.tokenizer.encode(PROMPTS[i % len(PROMPTS)])[: int(rng.integers(1, 30))] or [5]
        others.append(engine.submit(p, SamplingParams(
            max_tokens=int(rng.integers(1, 25)), temperature=float(rng.uniform(0, 1.5)),
            top_k=int(rng.integers(0, 50)), seed=int(rng.integers(1000)), ignore_eos=True)))
        if i == 7:
            mine = engine.submit(target, params)
    while not mine.finished or not all(o.finished for o in others):
        engine.step()
    assert mine.output == alone
    other_seed = _engine(run).generate([target], SamplingParams(
        max_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=99, ignore_eos=True))
    assert other_seed[0].output != alone


def test_compiled_programs_are_the_buckets(run):
    """Prompts of any length and number compile one prefill program per (row bucket, chunk
    bucket) of first chunks met, one per row bucket of later chunks (always chunk_size long) met
    and one decode program per kv bucket met, each counted by hand below, and never more than
    `max_compiled_shapes()`."""
    config = EngineConfig(slots=4, chunk_size=16, min_chunk=8, max_context=run.seq_len)
    assert config.chunk_buckets() == (8, 16) and config.row_buckets() == (1, 2, 4)
    engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer, config)
    # cache rows: 64 context + 16 chunk, rounded up to 128; buckets 16 x 2^i and 24 x 2^i below.
    assert engine.kv_buckets == (16, 24, 32, 48, 64, 96, 128)
    assert engine.max_compiled_shapes() == 2 * (3 * 2 + 3 + 7)
    assert engine.compiled_shapes() == 0
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    # 3 prompts (2, 5, 7 tokens with BOS), one burst: first chunks [4 rows, 8]; one decode
    # call (8 tokens) covers max_tokens 3: kv >= 7 + 1 + 8, bucket 16.
    engine.generate([list(range(3, 3 + n)) for n in (1, 4, 6)], params)
    assert engine.stats["prefill_calls"] == 1
    assert engine.compiled_shapes() == 2
    # 3 and 31 tokens: first chunks [2, 16], then a later chunk [1, 16] for the long one;
    # decode kv >= 31 + 1 + 8: bucket 48.
    engine.generate([list(range(3, 3 + n)) for n in (2, 30)], params)
    assert engine.stats["prefill_calls"] == 3
    assert engine.compiled_shapes() == 5
    # Four short prompts reuse first chunks [4, 8]; the fifth (61 tokens) waits for a slot, then
    # takes a first chunk [1, 16] (new) and three later chunks [1, 16] (compiled above); the
    # short ones decode in kv 16 (compiled), the long one in kv >= 61 + 1 + 8: bucket 96 (new).
    engine.generate([list(range(3, 3 + n)) for n in (1, 2, 3, 4, 60)],
                    SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.5, top_k=3))
    assert engine.stats["prefill_calls"] == 3 + 1 + 4
    assert engine.compiled_shapes() == 7
    # Logprobs are computed only by a second variant of each program, compiled when first asked.
    engine.generate([[3, 4, 5]], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2))
    assert engine.compiled_shapes() == 9  # first chunks [1, 8] and kv 16, with logprobs
    assert engine.compiled_shapes() <= engine.max_compiled_shapes()


def test_prefill_rows_cap(run):
    """prefill_rows below the slot count: a burst of 4 prompts with at most 3 rows per call is
    split as counted by hand ([4, ...] is never built), and the greedy tokens equal the plain
    sampler's."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [run.tokenizer.encode(p) for p in PROMPTS[:4]]
    capped = _engine(run, prefill_rows=3)
    assert capped.config.row_buckets() == (1, 2, 3)
    got = [r.output for r in capped.generate(prompts, params)]
    assert [len(p) + 1 <= 16 for p in prompts] == [True, True, False, True]
    k = -(-(len(prompts[2]) + 1) // 16)  # chunks of the long prompt (BOS included)
    # [P0, P1, P2 first chunk], then P2's k - 1 later chunks one by one (a later chunk and a
    # first chunk never share a call), then P3.
    assert capped.stats["prefill_calls"] == 1 + (k - 1) + 1
    assert got == generate(run.graphdef, run.params, run.cfg, [[BOS_ID, *p] for p in prompts],
                           max_new_tokens=4, temperature=0.0, top_k=0, eos_id=-1)


def test_prefill_while_decoding_stays_within_one_chunk(run):
    """While a slot decodes, one step prefills at most chunk_size padded tokens: with 8-token
    buckets and 16-token chunks, two of three waiting short prompts per step, in one call."""
    engine = _engine(run)
    long = engine.submit([3, 4, 5], SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()
    assert engine.stats["prefill_calls"] == 1
    short = [engine.submit([6, 7, 8, 9], SamplingParams(max_tokens=2, ignore_eos=True))
             for _ in range(3)]
    engine.step()
    assert engine.stats["prefill_calls"] == 2 and engine.stats["prefill_chunks"] == 3
    assert [r.prefilled for r in short] == [5, 5, 0]
    while not long.finished:
        engine.step()
    assert all(r.finished and len(r.output) == 2 for r in short)


def test_multi_step_decode_equals_one_step(run):
    """K tokens per decode call give exactly what one token per call gives: tokens, text,
    logprobs and finish reason, with stops falling inside a K-token burst (the tokens after
    them dropped) and max_tokens not a multiple of K; the slot is free when generate returns."""
    prompts = [run.tokenizer.encode(p) for p in PROMPTS]
    greedy = run.tokenizer.decode(
        _engine(run, decode_steps=1).generate([prompts[1]], SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True))[0].output)
    cases = [SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, logprobs=2),
             SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(greedy[6:9],)),
             SamplingParams(max_tokens=13, temperature=0.9, top_k=30, seed=5, logprobs=3),
             SamplingParams(max_tokens=11, temperature=1.2, seed=8, ignore_eos=True,
                            stop_token_ids=(int(prompts[0][1]),))]

    def run_all(steps):
        engine = _engine(run, decode_steps=steps)
        reqs = [engine.submit(prompts[i % len(prompts)], p) for i, p in enumerate(cases)]
        reqs.append(engine.submit(prompts[1], cases[1]))
        while not all(r.finished for r in reqs):
            engine.step()
        assert engine.active_slots() == 0
        return reqs

    ones, fives = run_all(1), run_all(5)
    assert ones[1].finish_reason == "stop" and len(ones[1].output) < 16
    assert len(ones[0].output) == 7
    for a, b in zip(ones, fives):
        assert (a.output, a.text, a.finish_reason) == (b.output, b.text, b.finish_reason)
        assert [e.token_id for e in a.logprobs] == [e.token_id for e in b.logprobs]
        np.testing.assert_allclose([e.logprob for e in a.logprobs],
                                   [e.logprob for e in b.logprobs], atol=1e-6)
        assert [[t for t, _ in e.top] for e in a.logprobs] == [
            [t for t, _ in e.top] for e in b.logprobs]


def test_filters_keep_the_hand_computed_support():
    """p = [0.5, 0.3, 0.15, 0.05]: top_k=2 and top_p=0.7 keep {0, 1} (renormalised 5:3), min_p=0.2
    keeps p >= 0.1 = {0, 1, 2}; temperature 0 is the argmax."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = jnp.asarray(np.log(np.tile(probs, (n, 1))), jnp.float32)
    keys = jax.random.split(jax.random.key(0), n)

    def draw(t=1.0, k=0, p=1.0, m=0.0):
        col = lambda v, d: jnp.full((n,), v, d)  # noqa: E731
        out = sample_tokens(logits, keys, col(t, jnp.float32), col(k, jnp.int32),
                            col(p, jnp.float32), col(m, jnp.float32))
        return np.bincount(np.asarray(out), minlength=4) / n

    for freq in (draw(k=2), draw(p=0.7)):
        assert freq[2] == freq[3] == 0
        assert abs(freq[0] - 0.5 / 0.8) < 0.03
    freq = draw(m=0.2)
    assert freq[3] == 0 and abs(freq[2] - 0.15 / 0.95) < 0.03
    assert draw(t=0.0)[0] == 1.0
    assert np.all(np.abs(draw() - probs) < 0.03)


def test_stop_strings_stop_tokens_and_max_tokens(run):
    engine = _engine(run)
    prompt = run.tokenizer.encode(PROMPTS[1])
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    [full] = engine.generate([prompt], greedy)
    assert len(full.output) == 16 and full.text == run.tokenizer.decode(full.output)
    stop = full.text[5:8]
    cut = full.text.index(stop)
    [r] = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0,
                                                   ignore_eos=True, stop=(stop,)))
    assert r.text == full.text[:cut] and r.finish_reason == "stop"
    [r] = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0,
                                                   ignore_eos=True,
                                                   stop_token_ids=(full.output[3],)))
    first = full.output.index(full.output[3])
    assert r.output == full.output[:first + 1] and r.finish_reason == "stop"
    assert r.text == run.tokenizer.decode(full.output[:first])


def test_slots_free_on_finish_and_cancel(run):
    engine = _engine(run)  # 4 slots
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    a, *others = [engine.submit([5 + i, 6, 7], long) for i in range(4)]
    c = engine.submit([10], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.active_slots() == 4 and engine.queue_depth() == 1
    engine.cancel(a)
    engine.step()
    assert a.finish_reason == "cancelled" and c.slot == a.slot
    while not (all(b.finished for b in others) and c.finished):
        engine.step()
    assert engine.active_slots() == 0 and len(c.output) == 2
    assert all(len(b.output) == 30 for b in others)


def test_bad_requests_raise(run):
    engine = _engine(run)
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit([5] * 10, SamplingParams(max_tokens=119))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([5], SamplingParams(max_tokens=-1))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([5], SamplingParams(top_p=0))


def test_int8_kv_cache_within_bound_of_fp32(run):
    """The int8 cache: each stored element within scale/2 of the value (absmax / 127 per
    vector, by hand); logits of a 48-token cached forward within 2% of the largest logit of the
    fp32-cache forward; and the engine on an int8 cache gives the plain sampler's int8 greedy
    tokens (chunked prefill and multi-step decode quantize the same vectors)."""
    from flax import nnx

    from llm.model.attention import dequantize_int8, quantize_int8
    from llm.serve.sampler import init_caches

    x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * jnp.array([0.01, 1.0, 30.0])[:, None,
                                                                                          None]
    q, scale = quantize_int8(x)
    assert q.dtype == jnp.int8 and scale.shape == (3, 5)
    np.testing.assert_allclose(scale, np.abs(np.asarray(x)).max(-1) / 127, rtol=1e-6)
    err = np.abs(np.asarray(dequantize_int8(q, scale, jnp.float32)) - np.asarray(x))
    assert np.all(err <= np.asarray(scale)[..., None] / 2 + 1e-7)

    ids = jnp.asarray([[BOS_ID, *run.tokenizer.encode(PROMPTS[2])[:47]]])
    logits = {}
    for dtype in ("model", "int8"):
        graphdef, state = init_caches(run.cfg, 1, 64, dtype)
        model = nnx.merge(run.graphdef, run.params)
        logits[dtype] = np.asarray(model(
            ids, positions=jnp.arange(ids.shape[1])[None], caches=list(nnx.merge(graphdef, state)),
            cache_lengths=jnp.zeros((1,), jnp.int32)))
    stored = {a.dtype for a in jax.tree.leaves(init_caches(run.cfg, 1, 64, "int8")[1])}
    assert stored == {jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)}  # values and scales
    diff = np.abs(logits["int8"] - logits["model"]).max()
    assert 0 < diff <= 0.02 * np.abs(logits["model"]).max(), diff

    prompts = [run.tokenizer.encode(p) for p in PROMPTS]
    reqs = _engine(run, kv_cache_dtype="int8").generate(
        prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ref = generate(run.graphdef, run.params, run.cfg, [[BOS_ID, *p] for p in prompts],
                   max_new_tokens=12, temperature=0.0, top_k=0, eos_id=-1,
                   kv_cache_dtype="int8")
    assert [r.output for r in reqs] == ref
