"""Streaming, parallel prepare: local (several processes) and Apache Beam (the DirectRunner in
2 processes, so every function crosses a process boundary) write byte-identical shards and the
same dataset.json; shards are per split and domain."""

import gzip
import hashlib
import json
import os

import pytest

from llm.data import prepare as prepare_data
from llm.data import shards, sources, tokenizer
from tests.data import TINY_VOCAB, tiny_docs

BEAM_MULTIPROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def write_jsonl_corpus(root) -> str:
    """tiny_docs as 4 JSONL.gz files, domains 'code' and 'prose' alternating."""
    os.makedirs(root, exist_ok=True)
    docs = tiny_docs()
    for f in range(4):
        with gzip.open(os.path.join(root, f"part-{f}.jsonl.gz"), "wt", encoding="utf-8") as out:
            for i, d in enumerate(docs[f::4]):
                out.write(json.dumps({"id": d.id, "text": d.text,
                                      "domain": ["code", "prose"][(i + f) % 2]}) + "\n")
    return os.path.join(root, "*.jsonl.gz")


def corpus_fn(pattern):
    return lambda: sources.jsonl(pattern, id_field="id")


def files(data_dir):
    return {n: hashlib.sha256(open(os.path.join(data_dir, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(data_dir))}


KW = dict(vocab_size=TINY_VOCAB, validation_fraction=0.25, num_shards=2)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_vs_local")
    pattern = write_jsonl_corpus(str(root / "corpus"))
    out = str(root / "local")
    with pytest.MonkeyPatch.context() as m:  # use the worker pool even for this tiny corpus
        m.setattr(prepare_data, "POOL_MIN_BYTES", 0)
        info = prepare_data.prepare(out, corpus_fn=corpus_fn(pattern), num_workers=2, **KW)
    return pattern, out, info


def test_shards_per_domain_in_corpus_order(local):
    pattern, out, info = local
    docs = list(sources.jsonl(pattern, id_field="id"))
    tok = tokenizer.load_tokenizer(info.tokenizer_path)
    for split in ("train", "validation"):
        s = info.splits[split]
        assert sorted(s.domains) == ["code", "prose"]
        expect = []
        for domain in ("code", "prose"):  # domain by domain, corpus order inside each
            mine = [d for d in docs if d.metadata["domain"] == domain
                    and sources.split_of(d.id, 0.25) == split]
            dom = s.domains[domain]
            assert dom["num_documents"] == len(mine)
            assert all(f.startswith(f"{split}.{domain}-") for f in dom["shards"])
            records = shards.read_all([os.path.join(out, f) for f in dom["shards"]])
            assert [tok.decode(r) for r in records] == [d.text for d in mine]
            expect += mine
        assert s.num_documents == len(expect)
        assert s.num_bytes == sum(len(d.text.encode()) for d in expect)


def test_single_process_is_identical(local, tmp_path):
    pattern, out, info = local
    one = prepare_data.prepare(str(tmp_path), corpus_fn=corpus_fn(pattern), num_workers=1, **KW)
    assert files(str(tmp_path)) == files(out) and one == info


@pytest.mark.slow
def test_beam_multiprocess_is_byte_identical(local, tmp_path):
    pytest.importorskip("apache_beam")
    pattern, out, info = local
    beam = prepare_data.prepare(str(tmp_path), corpus_fn=corpus_fn(pattern), runner="beam",
                                beam_options=BEAM_MULTIPROCESS, **KW)
    assert files(str(tmp_path)) == files(out)
    assert beam == info


def test_tokenizer_sample_is_seeded_and_bounded():
    docs = list(tiny_docs())
    routing = prepare_data.Routing(0.25, None)
    a = prepare_data.scan_documents(docs, routing, seed=0, sample_docs=10)["sample"]
    b = prepare_data.scan_documents(docs[::-1], routing, seed=0, sample_docs=10)["sample"]
    c = prepare_data.scan_documents(docs, routing, seed=1, sample_docs=10)["sample"]
    assert a == b and len(a) == 10 and a != c  # order-independent, seeded
    train = [d for d in docs if sources.split_of(d.id, 0.25) == "train"]
    smallest = sorted(train, key=lambda d: prepare_data.sample_key(d, 0))[:10]
    assert [x[1] for x in a] == [d.id for d in smallest]
    # merging per-unit samples gives the sample of the whole corpus
    parts = [prepare_data.scan_documents(docs[i::3], routing, 0, 10)["sample"] for i in range(3)]
    assert prepare_data.merge_samples(parts, 10) == a


def test_beam_needs_a_corpus_of_files(tmp_path):
    with pytest.raises(sources.DataError, match="runner='beam' needs a corpus of files"):
        prepare_data.prepare(str(tmp_path), corpus_fn=lambda: iter(tiny_docs()), runner="beam",
                             **KW)
