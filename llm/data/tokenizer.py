"""SentencePiece vocabularies with seqio / T5 id conventions.

Ids: pad=0, eos=1, unk=2, no bos (`objectives.PAD_ID/EOS_ID/UNK_ID`). `extra_ids` sentinels are
appended at the top of the vocabulary exactly as `seqio.SentencePieceVocabulary` does it (pieces
`▁<extra_id_i>` of type USER_DEFINED, reversed, so `extra_id(0)` is the last id), so our ids equal
seqio's ids for every text and `Tokenizer.to_seqio()` is a drop-in replacement.

Training settings are chosen for source code and English: identity normalization, no dummy
prefix, whitespace kept as it is (runs of spaces become pieces, so indentation is cheap), digits
split, and byte fallback so no text ever maps to <unk>: `decode(encode(text)) == text` for every
string (tested on Python source, English and non-ASCII text).

Piece scores are rounded to multiples of 2^-score_bits (default 1/8 nat) after training, so that
every Viterbi path sum is exact in float32 (SentencePiece's arithmetic) and in float64 (Hugging
Face `tokenizers`'): equal-score segmentations inside runs of repeated characters are then exact
ties in both, broken the same way, and an exported `tokenizer.json` gives our ids
(`quantize_scores`).
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Sequence

import gin
import numpy as np
import sentencepiece as spm

from llm.data.objectives import EOS_ID, PAD_ID, UNK_ID
from llm.data.sources import DataError

# Options that make an id-exact, lossless, seqio-compatible vocabulary. Part of the dataset
# fingerprint (tools/prepare_data.py), so changing one here invalidates prepared data.
SPM_OPTIONS = dict(
    pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
    split_by_whitespace=True, max_sentence_length=1 << 16,
    # We sample training text ourselves (deterministically), so sentencepiece must use it all,
    # in order.
    input_sentence_size=0, shuffle_input_sentence=False,
)

# Piece scores are multiples of 2^-SCORE_BITS (`quantize_scores`).
SCORE_BITS = 3


def training_sentences(texts: Iterable[str], max_chars: int, chunk_chars: int,
                       seed: int) -> list[str]:
    """A deterministic sample of at most ~`max_chars` characters of training "sentences".

    Each text is cut at line boundaries into chunks of at most `chunk_chars` characters (a longer
    single line becomes its own chunk), newlines included, so pieces can learn `"):\\n"` and
    indentation. Chunks are shuffled with `seed` and taken until `max_chars` is reached.
    """
    chunks: list[str] = []
    for text in texts:
        cur: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if cur and size + len(line) > chunk_chars:
                chunks.append("".join(cur))
                cur, size = [], 0
            cur.append(line)
            size += len(line)
        if cur:
            chunks.append("".join(cur))
    random.Random(seed).shuffle(chunks)
    out, total = [], 0
    for c in chunks:
        if total >= max_chars:
            break
        out.append(c)
        total += len(c)
    return out


@gin.configurable
def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 8192, *,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        max_training_chars: int | None = None, chunk_chars: int = 2000,
                        seed: int = 0, num_threads: int = 1,
                        user_defined_symbols: Sequence[str] = (),
                        score_bits: int | None = SCORE_BITS) -> str:
    """Trains a SentencePiece model on `texts` and writes it to `model_path`; returns the path.

    vocab_size: pieces in the model (pad, eos, unk and the 256 byte pieces included; seqio
      `extra_ids` come on top at load time).
    max_training_chars / chunk_chars / seed: the training sample (`training_sentences`).
      Default: 500 characters per piece, at most 3M -- an 8192-piece unigram model trains in
      ~8 s on one core, a 512-piece one in ~1.5 s (small vocabularies train much slower on
      large samples and gain nothing from them: 3M characters take 26 s for 512 pieces).
    num_threads: 1 keeps training bit-for-bit deterministic for a fixed input and seed.
    user_defined_symbols: strings reserved as single pieces of type USER_DEFINED, never split
      and never merged with their neighbours -- e.g. the chat role tags
      (`llm.serve.chat_template.ROLE_TAGS`, set by gin_configs/data/chat_tokens.gin). Off by
      default: turning it on changes the vocabulary, so it is part of the data fingerprint.
    score_bits: piece scores rounded to multiples of 2^-score_bits (`quantize_scores`); None
      keeps SentencePiece's float32 scores (an exported tokenizer.json may then differ from
      SentencePiece inside runs of repeated characters).
    """
    if max_training_chars is None:
        max_training_chars = min(3_000_000, 500 * vocab_size)
    sentences = training_sentences(texts, max_training_chars, chunk_chars, seed)
    if not sentences:
        raise DataError("No text to train the tokenizer on: the training split is empty. Check "
                        "the corpus (gin: `corpus.name` and its source's arguments).")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            num_threads=num_threads, minloglevel=2,
            **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols
               else {}), **SPM_OPTIONS)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed with vocab_size={vocab_size}: "
                        f"{str(e).splitlines()[0]} The vocabulary must fit the corpus: at least "
                        "its distinct characters + 259 (special ids and byte pieces), at most "
                        "what the text supports; change `prepare.vocab_size`.") from None
    proto = model.getvalue()
    if score_bits is not None:
        proto = quantize_scores(proto, score_bits)
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp = f"{model_path}.tmp"
    with open(tmp, "wb") as f:
        f.write(proto)
    os.replace(tmp, model_path)
    return model_path


def quantize_scores(model_proto: bytes, bits: int = SCORE_BITS) -> bytes:
    """The model with every piece score rounded to the nearest multiple of 2^-bits.

    Why: the unigram encoder is a forward Viterbi pass in which a candidate replaces the best
    path ending at a position only if its total score is strictly greater, trying start
    positions in order and, from each, pieces shortest first. SentencePiece
    (unigram_model.cc, EncodeOptimized) and `tokenizers` (unigram/model.rs, encode_optimized) run
    exactly that loop, but SentencePiece sums scores in float32 over the whole text and
    `tokenizers` in float64 over each pre-tokenized word. Inside runs of repeated characters
    several segmentations have mathematically equal totals (the same pieces in another order);
    float32 rounding then breaks the tie by the order of the additions, float64 sees an exact
    tie, and the two pick different ids. With scores on a 2^-bits grid every partial sum is a
    multiple of 2^-bits, exact in float32 while its magnitude is below 2^(24-bits) (24-bit
    significand) and in float64 below 2^(53-bits); both comparisons are then exact, ties are
    true ties in both, and both keep the earliest candidate -- the same ids by construction.
    bits=3 (the default) keeps SentencePiece's sums exact up to 2^21 ~ 2.1M nats along a text,
    ~390k tokens at the embedded corpus's 5.35 nats/token (its longest document: 281k tokens,
    1.50M nats); a longer single text may again differ in a tie (split it into documents).
    Rounding moves each score by at most 1/16 nat; bytes per token on the embedded corpus move
    by under 0.5% (docs/interop.md "Tokenizer").
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto.FromString(model_proto)
    for piece in model.pieces:
        piece.score = round(piece.score * 2**bits) / 2**bits
    return model.SerializeToString()


def _with_extra_ids(model_proto: bytes, extra_ids: int) -> bytes:
    """The model with seqio's sentinel pieces appended (same pieces, order and type as seqio)."""
    if not extra_ids:
        return model_proto
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto.FromString(model_proto)
    for i in reversed(range(extra_ids)):
        model.pieces.add(piece=f"▁<extra_id_{i}>", score=0.0,
                         type=pb.ModelProto.SentencePiece.USER_DEFINED)
    return model.SerializeToString()


class _RepoIds:
    """The special ids every tokenizer of this repo has (`objectives.PAD_ID/EOS_ID/UNK_ID`)."""

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID


class Tokenizer(_RepoIds):
    """A loaded SentencePiece model plus `extra_ids` sentinels; ids match seqio's."""

    def __init__(self, model_path: str, extra_ids: int = 0):
        self.model_path = model_path
        self.extra_ids = extra_ids
        try:
            with open(model_path, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise DataError(f"Tokenizer model {model_path!r} cannot be read ({e.strerror}). Run "
                            "`python -m tools.prepare_data --data_dir=...` to create it.") from None
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(_with_extra_ids(proto, extra_ids))
        except Exception as e:  # protobuf DecodeError or sentencepiece RuntimeError
            raise DataError(f"Tokenizer model {model_path!r} is corrupt ({type(e).__name__}: "
                            f"{e}). Delete it and re-run `python -m tools.prepare_data`.") from None
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise DataError(f"Tokenizer model {model_path!r} has pad/eos/unk ids "
                            f"{self._sp.pad_id()}/{self._sp.eos_id()}/{self._sp.unk_id()}, "
                            f"expected {PAD_ID}/{EOS_ID}/{UNK_ID} (seqio convention). Train it "
                            "with `llm.data.tokenizer.train_sentencepiece`.")

    def __getstate__(self):
        return {"model_path": self.model_path, "extra_ids": self.extra_ids}

    def __setstate__(self, state):
        self.__init__(state["model_path"], state["extra_ids"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, extra ids included (seqio's `vocab_size`)."""
        return self._sp.get_piece_size()

    def extra_id(self, i: int) -> int:
        """Id of sentinel `<extra_id_i>` (T5 order: extra_id(0) is the last id)."""
        if not 0 <= i < self.extra_ids:
            raise ValueError(f"extra_id({i}) out of range: this tokenizer has "
                             f"{self.extra_ids} extra ids (load_tokenizer(..., extra_ids=N)).")
        return self.vocab_size - 1 - i

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no EOS appended."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS; pad and eos produce no text (as seqio's decode)."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        size = self.vocab_size
        return self._sp.decode([i if 0 <= i < size else UNK_ID for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def to_seqio(self):
        """The same vocabulary as a `seqio.SentencePieceVocabulary` (imports TensorFlow)."""
        import seqio

        return seqio.SentencePieceVocabulary(self.model_path, extra_ids=self.extra_ids)


class HFTokenizer(_RepoIds):
    """A Hugging Face `tokenizers` tokenizer.json (byte-level BPE as GPT-2's and Llama-3's, or any
    other model type) behind `Tokenizer`'s interface, for runs imported by `tools.hf import`.

    The file is the source's tokenizer.json relabelled by `llm.interop.hf.relabel_tokenizer_json`
    so that pad=0, eos=1, unk=2 (the `objectives` constants) are special added tokens; every
    other id is the source's, shifted. A source BOS (Llama-3's <|begin_of_text|>) is id 0, the
    BOS this repo puts in front of every document and prompt itself (`objectives.shift_right`,
    the evaluator's and the engine's BOS_ID), so `encode` leaves it out: [0] + encode(text) is
    `AutoTokenizer(...).encode(text)` relabelled (GPT-2 adds nothing; id 0 is then an added pad
    row). `decode` stops at the first EOS and drops special tokens, as SentencePiece drops
    control pieces. No seqio vocabulary (`to_seqio` raises), no extra ids.
    """

    extra_ids = 0

    def __init__(self, model_path: str):
        from tokenizers import Tokenizer as _HF

        self.model_path = model_path
        if not os.path.isfile(model_path):
            raise DataError(f"Tokenizer {model_path!r} does not exist; a run imported by "
                            "`python -m tools.hf import` keeps it as tokenizer.json.")
        try:
            self._tok = _HF.from_file(model_path)
        except Exception as e:  # tokenizers raises a plain Exception on a malformed file
            raise DataError(f"Tokenizer {model_path!r} is not a valid tokenizer.json "
                            f"({str(e).splitlines()[0][:200]}).") from None
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                 if t.special}
        if not {PAD_ID, EOS_ID, UNK_ID} <= set(added.values()):
            raise DataError(f"Tokenizer {model_path!r} is a tokenizer.json whose ids "
                            f"{PAD_ID}/{EOS_ID}/{UNK_ID} are not special pad/eos/unk tokens (this "
                            "repo's convention); import the Hugging Face directory with "
                            "`python -m tools.hf import --hf_dir=... --run_dir=...`, which "
                            "relabels them.")

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def extra_id(self, i: int) -> int:
        raise ValueError(f"extra_id({i}): tokenizer {self.model_path!r} (tokenizer.json) has no "
                         "extra ids; span corruption needs a SentencePiece tokenizer.")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (the source post-processor's specials, e.g. a BOS, included; no
        EOS appended unless the source's post-processor appends one)."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS; special tokens (pad, eos, BOS, ...) produce no text
        and ids outside the vocabulary none either."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        size = self.vocab_size
        return self._tok.decode([i for i in ids if 0 <= i < size], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def to_seqio(self):
        raise DataError(f"tokenizer {self.model_path!r} is a Hugging Face tokenizer.json; seqio "
                        "vocabularies are SentencePiece models, so seqio tasks need a run or "
                        "data directory with a tokenizer.model.")


def is_tokenizer_json(path: str) -> bool:
    """Whether `path` holds a JSON document (a tokenizer.json) rather than a SentencePiece
    protobuf: decided by the content, so a copy under any name (prepare's tokenizer.model)
    still loads as what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return path.endswith(".json")
    return head.startswith(b"{")


def load_tokenizer(model_path: str, extra_ids: int = 0) -> Tokenizer | HFTokenizer:
    """Loads a model written by `train_sentencepiece`, or a tokenizer.json written by
    `tools.hf import` (`HFTokenizer`); DataError if it is missing or corrupt."""
    if is_tokenizer_json(model_path):
        if extra_ids:
            raise DataError(f"extra_ids={extra_ids}: tokenizer {model_path!r} is a "
                            "tokenizer.json, which has no seqio extra ids; use a SentencePiece "
                            "tokenizer for span corruption.")
        return HFTokenizer(model_path)
    return Tokenizer(model_path, extra_ids)


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Each text's ids + EOS as int32: one shard record per document."""
    return [np.asarray([*ids, EOS_ID], dtype=np.int32) for ids in tok.encode_batch(texts)]


_WORKER_TOKENIZER: Tokenizer | None = None


def init_worker(model_path: str) -> None:
    """Pool initializer: loads the tokenizer once per worker process."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(model_path)


def encode_in_worker(texts: Sequence[str]) -> list[np.ndarray]:
    """`encode_documents` with the worker's tokenizer (see `init_worker`)."""
    return encode_documents(_WORKER_TOKENIZER, texts)
