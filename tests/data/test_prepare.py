import gzip
import json
import os

import gin
import pytest

from llm.data import prepare as prepare_data
from llm.data import shards, sources, tokenizer
from llm.data.objectives import EOS_ID
from tests.data import TINY_VOCAB, tiny_corpus, tiny_docs

KW = dict(corpus_fn=tiny_corpus, vocab_size=TINY_VOCAB, validation_fraction=0.25, num_shards=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("prepared"))
    return prepare_data.prepare(data_dir, **KW)


def test_layout_and_counts(prepared):
    info = shards.load_dataset_info(prepared.data_dir)
    assert info == prepared and info.vocab_size == TINY_VOCAB
    with open(os.path.join(prepared.data_dir, "dataset.json")) as f:
        raw = json.load(f)
    assert set(raw["splits"]) == {"train", "validation"}
    assert all(not os.path.isabs(p) for s in raw["splits"].values() for p in s["shards"])
    tok = tokenizer.load_tokenizer(info.tokenizer_path)
    split = sources.split_documents(tiny_docs(), 0.25)
    for name, docs in split.items():
        s = info.splits[name]
        assert s.num_documents == len(docs) > 0
        assert s.num_bytes == sum(len(d.text.encode()) for d in docs)
        records = shards.read_all(info.shard_paths(name))
        assert len(records) == len(docs) and s.num_tokens == sum(map(len, records))
        for d, r in zip(docs, records):  # one record per document, in order, EOS-terminated
            assert r[-1] == EOS_ID and EOS_ID not in r[:-1]
            assert tok.decode(r) == d.text
    # gzip -9 of each validation shard's text, summed (shards are written independently)
    val, gz = split["validation"], 0
    for k in range(2):
        part = val[k * len(val) // 2:(k + 1) * len(val) // 2]
        gz += len(gzip.compress("".join(d.text for d in part).encode(), 9, mtime=0))
    assert info.splits["validation"].gzip_bytes == gz


def test_gzip_bits_per_byte():
    size, n, bpb = prepare_data.gzip_bits_per_byte(["abc" * 1000, "def"])
    assert n == 3003 and bpb == 8 * size / n and bpb < 1
    text = "".join(d.text for d in tiny_docs())
    assert 1.0 < prepare_data.gzip_bits_per_byte([text])[2] < 4.0


def test_idempotent_and_fingerprint_tracks_inputs(prepared, tmp_path, capsys):
    data_dir = prepared.data_dir
    json_path = os.path.join(data_dir, "dataset.json")
    mtime = os.path.getmtime(json_path)
    again = prepare_data.prepare(data_dir, **KW)
    assert again == prepared and os.path.getmtime(json_path) == mtime
    assert "up to date" in capsys.readouterr().out

    docs = list(tiny_docs())
    changed = docs[:-1] + [sources.Document(docs[-1].id, docs[-1].text + "x", "tiny")]
    settings = prepared.settings
    assert prepare_data.fingerprint(docs, settings) == prepared.fingerprint
    assert prepare_data.fingerprint(changed, settings) != prepared.fingerprint
    renamed = docs[:-1] + [sources.Document("other-id", docs[-1].text, "tiny")]
    assert prepare_data.fingerprint(renamed, settings) != prepared.fingerprint
    for key, value in [("vocab_size", 500), ("validation_fraction", 0.3), ("seed", 1)]:
        assert prepare_data.fingerprint(docs, {**settings, key: value}) != prepared.fingerprint

    # A changed setting rebuilds (into a copy, to leave the module fixture alone).
    other = prepare_data.prepare(str(tmp_path), **{**KW, "vocab_size": TINY_VOCAB + 20})
    assert other.fingerprint != prepared.fingerprint and other.vocab_size == TINY_VOCAB + 20
    assert "up to date" not in capsys.readouterr().out


def test_empty_corpus_and_empty_split(tmp_path):
    with pytest.raises(sources.DataError, match=r"no documents.*corpus\.name"):
        prepare_data.prepare(str(tmp_path), **{**KW, "corpus_fn": lambda: iter(())})
    with pytest.raises(sources.DataError, match=r"validation split is empty.*validation_fraction"):
        prepare_data.prepare(str(tmp_path), **{**KW, "validation_fraction": 0.0})


def test_cli_with_gin(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for d in tiny_docs()[:24]:
        (src / (d.id.replace("/", "_") + ".txt")).write_text(d.text)
    data_dir = tmp_path / "out"
    try:
        assert prepare_data.main([
            f"--data_dir={data_dir}", f"--gin_param=prepare.vocab_size={TINY_VOCAB}",
            "--gin_param=prepare.validation_fraction=0.3", "--gin_param=corpus.name='files'",
            f"--gin_param=text_files.pattern='{src}'"]) == 0
    finally:
        gin.clear_config()
    info = shards.load_dataset_info(str(data_dir))
    assert info.splits["train"].num_documents + info.splits["validation"].num_documents == 24
    assert (data_dir / "dataset.json").exists() and (data_dir / "tokenizer.model").exists()


def test_tokenizer_gin_bindings_are_part_of_the_settings():
    default = prepare_data._train_sentencepiece_settings()
    assert default["model_type"] == "unigram"
    try:
        gin.bind_parameter("train_sentencepiece.chunk_chars", 1000)
        assert prepare_data._train_sentencepiece_settings() == {**default, "chunk_chars": 1000}
    finally:
        gin.clear_config()


def test_rescan_false_reuses_without_reading_the_corpus(prepared, capsys):
    def unreadable():
        raise AssertionError("the corpus was read")

    info = prepare_data.prepare(prepared.data_dir, **{**KW, "corpus_fn": unreadable},
                                rescan=False)
    assert info == prepared and "without rescanning" in capsys.readouterr().out
