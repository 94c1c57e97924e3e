"""Train-time mixtures of a prepared dataset's domains (`make_dataset.mixture`): token shares,
the per-domain token report checked against an independent attribution, exact resume, process
count invariance, temperature rates, bad input."""

import json
import os

import numpy as np
import pytest

from llm.data import pipeline, shards, sources
from llm.data import prepare as prepare_data
from llm.data.objectives import NEXT_TOKEN
from tests.data import TINY_VOCAB, tiny_corpus
from tests.data.test_prepare_beam import KW, corpus_fn, write_jsonl_corpus

SEQ, BATCH = 64, 8
RATES = {"code": 0.75, "prose": 0.25}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    pattern = write_jsonl_corpus(str(root / "corpus"))
    out = str(root / "data")
    prepare_data.prepare(out, corpus_fn=corpus_fn(pattern), num_workers=1, **KW)
    return out


def make(data_dir, **kw):
    args = dict(seq_len=SEQ, global_batch_size=BATCH, seed=0, objective=NEXT_TOKEN,
                process_index=0, process_count=1, num_streams=2, mixture=RATES)
    return pipeline.make_dataset(data_dir, "train", **{**args, **kw})


def domain_documents(data_dir) -> dict[str, list[bytes]]:
    info = shards.load_dataset_info(data_dir)
    return {d: [r.tobytes() for r in shards.read_all([os.path.join(data_dir, f)
                                                      for f in paths])]
            for d, paths in info.splits["train"].domain_shards().items()}


def attribute(batch, docs) -> dict[str, int] | None:
    """Tokens per domain of a batch, found by searching each packed segment in the documents of
    each domain; None if some segment is found in both or neither."""
    out = dict.fromkeys(docs, 0)
    for targets, seg in zip(batch["targets"], batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            piece = targets[seg == s].astype("<i4").tobytes()
            hits = [d for d, ds in docs.items()
                    if any(i % 4 == 0 for doc in ds for i in _finds(doc, piece))]
            if len(hits) != 1:
                return None
            out[hits[0]] += len(piece) // 4
    return out


def _finds(haystack: bytes, needle: bytes):
    i = haystack.find(needle)
    while i != -1:
        yield i
        i = haystack.find(needle, i + 1)


def test_reported_tokens_match_an_independent_attribution_and_the_rates(data_dir):
    docs = domain_documents(data_dir)
    it = iter(make(data_dir))
    checked, before = 0, np.zeros(2, np.int64)
    for _ in range(150):
        batch = next(it)
        assert pipeline.MIXTURE_TOKENS not in batch
        delta = it.mixture_tokens - before
        before = it.mixture_tokens.copy()
        assert delta.sum() == (batch["segment_ids"] > 0).sum()
        found = attribute(batch, docs)
        if found is not None:
            assert [found["code"], found["prose"]] == delta.tolist()
            checked += 1
    assert checked >= 50, checked
    print("checked", checked, it.mixture_proportions())
    shares = it.mixture_proportions()
    # token shares over 150 * 8 * 64 tokens; ~280 documents drawn, their lengths make the noise
    assert abs(shares["code"] - RATES["code"]) < 0.05, shares


def test_domains_are_drawn_by_rate_without_rereading_others(data_dir):
    only = iter(make(data_dir, mixture={"prose": 1.0}))
    for _ in range(20):
        next(only)
    assert only.mixture_proportions() == {"prose": 1.0}


def test_resume_is_exact_including_the_counts(data_dir):
    it = iter(make(data_dir))
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # grain.checkpoint stores JSON
    expect = [next(it) for _ in range(5)]
    counts = it.mixture_tokens.copy()
    again = iter(make(data_dir))
    again.set_state(state)
    got = [next(again) for _ in range(5)]
    for a, b in zip(expect, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(again.mixture_tokens, counts)


def test_global_batch_does_not_depend_on_process_count(data_dir):
    one = iter(make(data_dir))
    halves = [iter(make(data_dir, process_index=p, process_count=2)) for p in range(2)]
    for _ in range(6):
        a = next(one)
        b = [next(h) for h in halves]
        for k in a:
            np.testing.assert_array_equal(a[k], np.concatenate([x[k] for x in b]), err_msg=k)


def test_temperature_rates_by_hand(data_dir):
    components = pipeline.mixture_components(data_dir, "train")
    tokens = {d: c["num_tokens"] for d, c in components.items()}
    rates = pipeline.mixture_rates(components, None, 2.0)
    z = tokens["code"] ** 0.5 + tokens["prose"] ** 0.5
    assert rates == pytest.approx({"code": tokens["code"] ** 0.5 / z,
                                   "prose": tokens["prose"] ** 0.5 / z})
    assert pipeline.mixture_rates(components, {"code": 3, "prose": 1}, None) == \
        {"code": 0.75, "prose": 0.25}


@pytest.fixture(scope="module")
def other_dir(data_dir, tmp_path_factory):
    """A second prepared dataset (no domains) sharing data_dir's tokenizer."""
    out = str(tmp_path_factory.mktemp("other"))
    docs = [sources.Document(f"other/{i}", f"Other dataset line {i}: " + "zebra quartz " * i,
                             "other") for i in range(40)]
    prepare_data.prepare(out, corpus_fn=lambda: iter(docs), validation_fraction=0.25,
                         tokenizer_model=os.path.join(data_dir, "tokenizer.model"))
    return out


def test_mixing_another_prepared_dataset(data_dir, other_dir):
    docs = {"code": domain_documents(data_dir)["code"], "other": domain_documents(other_dir)[""]}
    it = iter(make(data_dir, mixture={"code": 0.5, "other": 0.5},
                   mixture_datasets={"other": other_dir}))
    checked, before = 0, np.zeros(2, np.int64)
    for _ in range(60):
        batch = next(it)
        delta, before = it.mixture_tokens - before, it.mixture_tokens.copy()
        found = attribute(batch, docs)
        if found is not None:
            assert [found["code"], found["other"]] == delta.tolist()
            checked += 1
    assert checked >= 20 and abs(it.mixture_proportions()["other"] - 0.5) < 0.1


def test_datasets_must_share_the_tokenizer(data_dir, tmp_path):
    prepare_data.prepare(str(tmp_path), corpus_fn=tiny_corpus, vocab_size=TINY_VOCAB - 10,
                         validation_fraction=0.25)
    with pytest.raises(sources.DataError, match="another tokenizer.*prepare.tokenizer_model"):
        make(data_dir, mixture={"code": 1.0, "x": 1.0}, mixture_datasets={"x": str(tmp_path)})


def test_evaluation_passes_ignore_the_mixture(data_dir):
    a = list(make(data_dir, shuffle=False, num_epochs=1))
    b = list(make(data_dir, shuffle=False, num_epochs=1, mixture=None))
    assert len(a) == len(b) and all((x["targets"] == y["targets"]).all() for x, y in zip(a, b))


def test_bad_mixtures(data_dir):
    with pytest.raises(sources.DataError, match=r"\['web'\].*datasets \['code', 'prose'\]"):
        make(data_dir, mixture={"web": 1.0})
    with pytest.raises(ValueError, match="rates must be > 0"):
        make(data_dir, mixture={"code": 1.0, "prose": 0})
    with pytest.raises(ValueError, match="not both"):
        make(data_dir, mixture_temperature=2.0)
