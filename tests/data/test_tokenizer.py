import pathlib

import numpy as np
import pytest

from llm.data import sources, tokenizer
from llm.data.objectives import EOS_ID, PAD_ID, UNK_ID
from tests.data import ENGLISH, TINY_VOCAB, UNICODE, tiny_docs

CODE = '''class Foo(Bar):
    """Docstring with  two spaces."""

    def f(self, x=12345):
        if x:   # trailing spaces{TRAIL}
            return {"a": [1, 2.5e-3]}
\treturn None

'''.replace("{TRAIL}", "   ")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return tokenizer.train_sentencepiece((d.text for d in tiny_docs()), str(path),
                                         vocab_size=TINY_VOCAB)


@pytest.mark.parametrize("text", [CODE, ENGLISH, UNICODE, "", " leading space", "x\n\n\n",
                                  "    \n        \n", "12345678901234567890"])
def test_round_trip_is_exact_and_never_unk(model_path, text):
    tok = tokenizer.load_tokenizer(model_path)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids


def test_round_trip_whole_documents(model_path):
    tok = tokenizer.load_tokenizer(model_path)
    texts = [d.text for d in tiny_docs()]
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_ids_and_digits(model_path):
    tok = tokenizer.load_tokenizer(model_path)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    assert tok.vocab_size == TINY_VOCAB
    assert tok.id_to_piece(0) == "<pad>" and tok.id_to_piece(1) == "</s>"
    assert all(tok.id_to_piece(i) not in ("<s>",) for i in tok.encode(CODE))  # no BOS
    # split_digits: every digit is its own piece
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_decode_stops_at_eos_and_skips_pad(model_path):
    tok = tokenizer.load_tokenizer(model_path)
    ids = tok.encode("hello world")
    assert tok.decode(ids + [EOS_ID] + tok.encode("junk")) == "hello world"
    assert tok.decode(ids + [PAD_ID, PAD_ID]) == "hello world"
    assert tok.decode(np.asarray(ids + [EOS_ID])) == "hello world"


def test_extra_ids_are_t5_sentinels(model_path):
    tok = tokenizer.load_tokenizer(model_path, extra_ids=3)
    assert tok.vocab_size == TINY_VOCAB + 3
    assert tok.extra_id(0) == TINY_VOCAB + 2 == tok.vocab_size - 1
    assert tok.extra_id(2) == TINY_VOCAB
    assert tok.id_to_piece(tok.extra_id(1)) == "▁<extra_id_1>"
    assert tok.encode("hello") == tokenizer.load_tokenizer(model_path).encode("hello")
    with pytest.raises(ValueError, match="extra_ids"):
        tok.extra_id(3)


def test_training_is_deterministic(model_path, tmp_path):
    again = tokenizer.train_sentencepiece((d.text for d in tiny_docs()),
                                          str(tmp_path / "again.model"), vocab_size=TINY_VOCAB)
    assert pathlib.Path(again).read_bytes() == pathlib.Path(model_path).read_bytes()


def test_training_sample_is_deterministic_and_bounded():
    texts = [d.text for d in tiny_docs()]
    a = tokenizer.training_sentences(texts, max_chars=20_000, chunk_chars=500, seed=1)
    assert a == tokenizer.training_sentences(texts, max_chars=20_000, chunk_chars=500, seed=1)
    assert a != tokenizer.training_sentences(texts, max_chars=20_000, chunk_chars=500, seed=2)
    assert 20_000 <= sum(map(len, a)) < 20_000 + 6_000
    assert any("\n" in s for s in a)  # newlines stay inside training sentences


def test_missing_and_corrupt_model(tmp_path):
    with pytest.raises(sources.DataError, match="prepare_data"):
        tokenizer.load_tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(sources.DataError, match="corrupt"):
        tokenizer.load_tokenizer(str(bad))


def test_empty_training_text(tmp_path):
    with pytest.raises(sources.DataError, match="empty"):
        tokenizer.train_sentencepiece([], str(tmp_path / "m.model"), vocab_size=TINY_VOCAB)


def test_pickles(model_path):
    import pickle

    tok = pickle.loads(pickle.dumps(tokenizer.load_tokenizer(model_path, extra_ids=2)))
    assert tok.decode(tok.encode(CODE)) == CODE and tok.vocab_size == TINY_VOCAB + 2


@pytest.mark.slow
def test_seqio_parity(model_path):
    tok = tokenizer.load_tokenizer(model_path, extra_ids=4)
    vocab = tok.to_seqio()
    assert vocab.vocab_size == tok.vocab_size
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (tok.pad_id, tok.eos_id, tok.unk_id)
    for text in [CODE, ENGLISH, UNICODE, "fill <extra_id_0> here <extra_id_3>", ""]:
        ids = tok.encode(text)
        assert list(vocab.encode(text)) == ids
        assert vocab.decode(ids + [EOS_ID, 5, 6]) == tok.decode(ids + [EOS_ID, 5, 6])
    assert tok.encode("a <extra_id_0>")[-1] == tok.extra_id(0)
