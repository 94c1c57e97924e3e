"""Training objectives as data transforms: what a batch row means to the loss.

An `Objective` says which features are packed to which length (`lengths(seq_len)`; a document
arrives as {'targets': tokens + EOS}), and how one packed row becomes the fields the model and
loss read (`post_pack`). All transforms are pure numpy so they run inside grain workers.

Row fields produced for a decoder-only model, each `[seq_len]`:
  inputs       int32  token ids the model reads (per-segment shift-right of targets, BOS = PAD_ID)
  targets      int32  token ids the model predicts
  loss_mask    float32 1.0 where the target counts toward the loss
  segment_ids  int32  1, 2, ... per packed document; 0 is padding. Attention never crosses segments.
  positions    int32  position of each token inside its own document

Registered objectives (`get_objective.name`; docs/objectives.md):
  next_token       decoder-only, the fields above;
  prefix_lm        decoder-only, plus `prefix` (1 on the bidirectional prefix), loss on the suffix;
  bert_mlm         encoder-only: `inputs` corrupted 80/10/10, `loss_mask` on the selected tokens;
  span_corruption  encoder-decoder: `encoder_*` and `decoder_*` fields, `targets`, `loss_mask`,
                   `target_span_ids`.
The last two need the vocabulary (`VocabInfo`: [MASK] = `<extra_id_0>`, sentinels, the range of
random tokens) and are built by `get_objective(vocab=...)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gin
import numpy as np

PAD_ID = 0  # also the BOS fed to the first position of each segment (seqio / T5 convention)
EOS_ID = 1
UNK_ID = 2

Features = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Objective:
    """How documents become training rows.

    name: registry name.
    lengths: row length -> {feature name: packed length}; every objective packs the document's
      {'targets': tokens + EOS} (span corruption packs longer chunks than the rows it makes).
    post_pack: per packed row `(features, rng) -> row fields`; packed features arrive with
      `<name>_segment_ids` and `<name>_positions` beside each packed feature.
    model: the architecture the rows are for: "decoder" (decoder-only), "encoder" (encoder-only,
      bidirectional) or "encoder_decoder".
    """

    name: str
    lengths: Callable[[int], dict[str, int]]
    post_pack: Callable[[Features, np.random.Generator], Features]
    model: str = "decoder"


def shift_right(tokens: np.ndarray, segment_ids: np.ndarray, bos: int = PAD_ID) -> np.ndarray:
    """Shift each packed segment right by one, putting `bos` at every segment start.

    tokens, segment_ids: [length]. Returns [length]; padding (segment 0) stays PAD_ID.
    """
    shifted = np.concatenate([[bos], tokens[:-1]]).astype(tokens.dtype)
    starts = np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])
    shifted = np.where(starts, bos, shifted)
    return np.where(segment_ids > 0, shifted, PAD_ID).astype(np.int32)


def _next_token_post_pack(f: Features, rng: np.random.Generator) -> Features:
    del rng
    seg = f["targets_segment_ids"].astype(np.int32)
    targets = f["targets"].astype(np.int32)
    return {
        "inputs": shift_right(targets, seg),
        "targets": targets,
        "loss_mask": (seg > 0).astype(np.float32),
        "segment_ids": seg,
        "positions": f["targets_positions"].astype(np.int32),
    }


NEXT_TOKEN = Objective(name="next_token", lengths=lambda n: {"targets": n},
                       post_pack=_next_token_post_pack)

OBJECTIVES: dict[str, Objective] = {NEXT_TOKEN.name: NEXT_TOKEN}


@gin.configurable
def get_objective(name: str = "next_token", vocab: VocabInfo | None = None) -> Objective:
    """The objective registered under `name` (gin: `get_objective.name`).

    Objectives in `VOCAB_OBJECTIVES` (bert_mlm, span_corruption) are built from `vocab`, the
    vocabulary they draw mask, sentinel and random ids from.
    """
    if name in VOCAB_OBJECTIVES:
        if vocab is None:
            raise ValueError(f"Objective {name!r} needs the vocabulary (mask / sentinel ids): call "
                             "get_objective(vocab=VocabInfo.from_tokenizer(tokenizer)). Run it "
                             "with `python -m experiments.pretrain_mlm`.")
        return VOCAB_OBJECTIVES[name](vocab)
    if name not in OBJECTIVES:
        raise ValueError(f"get_objective.name={name!r} is not one of "
                         f"{', '.join(map(repr, sorted([*OBJECTIVES, *VOCAB_OBJECTIVES])))}; set "
                         "get_objective.name to one of them.")
    return OBJECTIVES[name]


# ---------------------------------------------------------------------------------------------
# Objectives that need the vocabulary (mask token, sentinels, the range of random tokens).
# ---------------------------------------------------------------------------------------------

FIRST_REGULAR_ID = UNK_ID + 1  # ids below this (pad, eos, unk) are special: never masked


@dataclasses.dataclass(frozen=True)
class VocabInfo:
    """What the masking objectives need to know about a vocabulary, as plain numpy.

    size: number of ids, extra ids included (`Tokenizer.vocab_size`).
    extra_ids: sentinels `<extra_id_i>` at the top of the vocabulary; `<extra_id_i>` has id
      size - 1 - i (seqio / T5 order). Regular tokens are [FIRST_REGULAR_ID, size - extra_ids).
    joins_left, joins_right: bool [size]; a token continues the previous token's word when the
      previous one `joins_right` and this one `joins_left` (their pieces touch with word
      characters: letters, digits, `_`). Used by whole-word masking; None disables it.
    """

    size: int
    extra_ids: int
    joins_left: np.ndarray | None = None
    joins_right: np.ndarray | None = None

    @property
    def regular_end(self) -> int:
        """One past the last regular (non-sentinel) id."""
        return self.size - self.extra_ids

    def extra_id(self, i: int) -> int:
        if not 0 <= i < self.extra_ids:
            raise ValueError(f"extra_id({i}) out of range: the vocabulary has {self.extra_ids} "
                             "extra ids (gin: `pretrain_mlm.extra_ids`).")
        return self.size - 1 - i

    @classmethod
    def from_tokenizer(cls, tok) -> VocabInfo:
        """From an `llm.data.tokenizer.Tokenizer` (loaded with the extra ids it needs)."""
        def word_char(c: str) -> bool:
            return c.isalnum() or c == "_"

        pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
        byte = [p.startswith("<0x") and p.endswith(">") and len(p) == 6 for p in pieces]
        left = np.array([b or (bool(p) and word_char(p[0])) for p, b in zip(pieces, byte)])
        right = np.array([b or (bool(p) and word_char(p[-1])) for p, b in zip(pieces, byte)])
        special = np.arange(tok.vocab_size) < FIRST_REGULAR_ID
        special[tok.vocab_size - tok.extra_ids:] = True
        return cls(size=tok.vocab_size, extra_ids=tok.extra_ids, joins_left=left & ~special,
                   joins_right=right & ~special)


def _segment_starts(segment_ids: np.ndarray) -> np.ndarray:
    return np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])


# ----- BERT masked LM --------------------------------------------------------------------------

def bert_mask_id(vocab: VocabInfo) -> int:
    """BERT's [MASK]: the sentinel `<extra_id_0>` (the last id), never a piece of real text."""
    if vocab.extra_ids < 1:
        raise ValueError("BERT masking needs a [MASK] id: the vocabulary has 0 extra ids, need at "
                         "least 1 (gin: `pretrain_mlm.extra_ids`).")
    return vocab.extra_id(0)


def bert_masking(tokens: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator,
                 vocab: VocabInfo, *, mask_rate: float = 0.15, mask_token_rate: float = 0.8,
                 random_token_rate: float = 0.1, whole_word: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """BERT corruption of one packed row. tokens, segment_ids: [length].

    Each regular token (not padding, EOS, UNK or a sentinel) is selected with probability
    `mask_rate` -- with `whole_word`, each word is, and all its tokens follow. A selected token is
    replaced by [MASK] with probability `mask_token_rate`, by a uniformly random regular token
    with `random_token_rate`, and kept otherwise.
    Returns (corrupted tokens [length] int32, selected [length] bool: the positions scored).
    """
    tokens = tokens.astype(np.int32)
    eligible = (segment_ids > 0) & (tokens >= FIRST_REGULAR_ID) & (tokens < vocab.regular_end)
    if whole_word:
        if vocab.joins_left is None or vocab.joins_right is None:
            raise ValueError("whole-word masking needs word boundaries: build the VocabInfo with "
                             "`VocabInfo.from_tokenizer(tokenizer)`.")
        prev = np.concatenate([[PAD_ID], tokens[:-1]])
        continues = (vocab.joins_right[prev] & vocab.joins_left[tokens] & eligible
                     & np.concatenate([[False], eligible[:-1]]) & ~_segment_starts(segment_ids))
        word = np.cumsum(eligible & ~continues)  # word index (1-based) of every token
    else:
        word = np.cumsum(eligible)
    chosen = rng.random(int(word[-1]) + 1 if len(word) else 1) < mask_rate
    selected = eligible & chosen[np.maximum(word, 0)] & (word > 0)
    u = rng.random(len(tokens))
    random_tokens = rng.integers(FIRST_REGULAR_ID, vocab.regular_end, len(tokens), dtype=np.int32)
    out = np.where(selected & (u < mask_token_rate), bert_mask_id(vocab), tokens)
    out = np.where(selected & (u >= mask_token_rate) & (u < mask_token_rate + random_token_rate),
                   random_tokens, out)
    return out.astype(np.int32), selected


@gin.configurable
def bert_mlm(vocab: VocabInfo, *, mask_rate: float = 0.15, mask_token_rate: float = 0.8,
             random_token_rate: float = 0.1, whole_word: bool = False) -> Objective:
    """BERT masked-LM rows for an encoder-only model (gin: `bert_mlm.*`).

    Rows are packed documents as for next-token (`targets` = the original tokens, full rows, one
    segment per document); `inputs` is the corrupted row (not shifted), `loss_mask` marks the
    selected positions. See `bert_masking`.
    """
    if not 0.0 < mask_rate <= 1.0:
        raise ValueError(f"bert_mlm.mask_rate={mask_rate} must be in (0, 1].")
    if mask_token_rate < 0 or random_token_rate < 0 or mask_token_rate + random_token_rate > 1:
        raise ValueError(f"bert_mlm.mask_token_rate={mask_token_rate} + random_token_rate="
                         f"{random_token_rate} must be non-negative and sum to at most 1.")
    bert_mask_id(vocab)  # fails early without an extra id

    def post_pack(f: Features, rng: np.random.Generator) -> Features:
        seg = f["targets_segment_ids"].astype(np.int32)
        targets = f["targets"].astype(np.int32)
        inputs, selected = bert_masking(targets, seg, rng, vocab, mask_rate=mask_rate,
                                        mask_token_rate=mask_token_rate,
                                        random_token_rate=random_token_rate,
                                        whole_word=whole_word)
        return {"inputs": inputs, "targets": targets, "loss_mask": selected.astype(np.float32),
                "segment_ids": seg, "positions": f["targets_positions"].astype(np.int32)}

    return Objective(name="bert_mlm", lengths=lambda n: {"targets": n}, post_pack=post_pack,
                     model="encoder")


# ----- T5 span corruption ----------------------------------------------------------------------

def span_counts(num_tokens: int, noise_density: float, mean_noise_span_length: float
                ) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of `num_tokens` tokens, as T5 rounds them.

    A chunk of fewer than 2 tokens gets no noise. Otherwise at least one noise token and one span,
    and at least one non-noise token.
    """
    if num_tokens < 2:
        return 0, 0
    noise = min(max(int(round(num_tokens * noise_density)), 1), num_tokens - 1)
    spans = max(int(round(noise / mean_noise_span_length)), 1)
    return noise, spans


def span_corruption_lengths(seq_len: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw chunk length, targets length) so a chunk's corrupted inputs fill `seq_len`.

    Inputs of a chunk of L tokens: L - noise + spans (one sentinel per span) + 1 (EOS); targets:
    noise + spans + 1. The chunk length is the largest L whose inputs fit in `seq_len` (as T5's
    `random_spans_helper`); the targets length is then fixed by L.
    """
    def inputs_targets(n: int) -> tuple[int, int]:
        noise, spans = span_counts(n, noise_density, mean_noise_span_length)
        return n - noise + spans + 1, noise + spans + 1

    n = 1
    while inputs_targets(n + 1)[0] <= seq_len:
        n += 1
    return n, inputs_targets(n)[1]


def natural_span_count(num_tokens: int, noise_density: float,
                       mean_noise_span_length: float) -> int:
    """Noise spans of a chunk before `span_counts` forces at least one: 0 means the chunk is too
    short to hold one span of the mean length at this density."""
    return int(round(int(round(num_tokens * noise_density)) / mean_noise_span_length))


def min_span_corruption_seq_len(noise_density: float, mean_noise_span_length: float) -> int:
    """The smallest row length whose chunk holds at least one noise span of the mean length."""
    seq_len = 3
    while natural_span_count(span_corruption_lengths(seq_len, noise_density,
                                                     mean_noise_span_length)[0],
                             noise_density, mean_noise_span_length) < 1:
        seq_len += 1
    return seq_len


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float,
                            mean_noise_span_length: float) -> np.ndarray:
    """bool [length]: which tokens are noise (T5 layout: non-noise span first, then alternating).

    Exactly `span_counts(length)` noise tokens in exactly that many spans; span lengths are a
    uniformly random composition of the noise (and of the non-noise) tokens.
    """
    noise, spans = span_counts(length, noise_density, mean_noise_span_length)
    if spans == 0:
        return np.zeros(length, bool)

    def composition(total: int) -> np.ndarray:  # `spans` positive parts summing to total
        cuts = np.sort(rng.choice(np.arange(1, total), spans - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise_lengths, keep_lengths = composition(noise), composition(length - noise)
    lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), lengths)


def corrupt_spans(tokens: np.ndarray, noise: np.ndarray, vocab: VocabInfo
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T5 span corruption of one chunk. tokens, noise: [length].

    Returns (inputs, targets, target_span_ids): inputs keep the non-noise tokens and put
    `<extra_id_k>` where the k-th noise span was; targets are `<extra_id_k>` + span k for every
    span; both end with EOS. target_span_ids [len(targets)] is k+1 on the tokens of span k and 0 on
    sentinels and EOS.
    """
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    span_index = np.cumsum(starts) - 1  # span of every noise token
    num_spans = int(starts.sum())
    if num_spans > vocab.extra_ids:
        raise ValueError(f"Span corruption needs {num_spans} sentinels but the vocabulary has "
                         f"{vocab.extra_ids} extra ids; raise `pretrain_mlm.extra_ids` to at least "
                         f"{num_spans} or lower the row length.")
    sentinels = vocab.size - 1 - span_index  # extra_id(k) for every noise position
    keep = ~noise | starts
    inputs = np.where(starts, sentinels, tokens)[keep]
    # targets: before every span start, its sentinel; then the span's tokens.
    tgt_tokens = np.stack([np.where(starts, sentinels, -1), tokens], axis=1)[noise].reshape(-1)
    tgt_span = np.stack([np.zeros_like(span_index), span_index + 1], axis=1)[noise].reshape(-1)
    valid = tgt_tokens >= 0
    targets, span_ids = tgt_tokens[valid], tgt_span[valid]
    return (np.append(inputs, EOS_ID).astype(np.int32), np.append(targets, EOS_ID).astype(np.int32),
            np.append(span_ids, 0).astype(np.int32))


def strip_row(x: np.ndarray) -> np.ndarray:
    """A corrupted row without its padding and the final EOS that `corrupt_spans` appends (EOS
    tokens inside are document boundaries, part of the content)."""
    x = np.asarray(x)
    n = len(x)
    while n and x[n - 1] == PAD_ID:
        n -= 1
    if n and x[n - 1] == EOS_ID:
        n -= 1
    return x[:n]


def split_spans(targets: np.ndarray, vocab: VocabInfo, num_spans: int | None = None
                ) -> dict[int, list[int]]:
    """Decoder targets `<extra_id_0> span_0 <extra_id_1> span_1 ... EOS` -> {sentinel id: span}.

    num_spans None: `targets` is a real target row (padding allowed after it). With num_spans
    (how many sentinels the inputs hold) it is a model's output: reading stops at padding, or at
    EOS once the last span's sentinel has been seen (EOS inside earlier spans is content).
    """
    last = vocab.extra_id(num_spans - 1) if num_spans else None
    seq = strip_row(targets) if num_spans is None else np.asarray(targets)
    spans: dict[int, list[int]] = {}
    current = None
    for t in seq.tolist():
        if t >= vocab.regular_end:
            current = spans.setdefault(t, [])
            sentinel = t
        elif num_spans is not None and (t == PAD_ID or (t == EOS_ID and (
                current is None or sentinel <= last))):
            break
        elif current is not None:
            current.append(t)
    return spans


def fill_spans(inputs: np.ndarray, targets: np.ndarray, vocab: VocabInfo,
               predicted: bool = False) -> np.ndarray:
    """Invert `corrupt_spans`: every sentinel in `inputs` becomes the tokens that follow the same
    sentinel in `targets`. Padding and the final EOS are dropped. predicted=True reads `targets`
    as a model's output (see `split_spans`); a sentinel missing from it becomes nothing."""
    inputs = strip_row(inputs)
    num_spans = int(np.sum(inputs >= vocab.regular_end)) if predicted else None
    spans = split_spans(targets, vocab, num_spans)
    out: list[int] = []
    for t in inputs.tolist():
        out.extend(spans.get(t, []) if t >= vocab.regular_end else [t])
    return np.asarray(out, np.int32)


@gin.configurable
def span_corruption(vocab: VocabInfo, *, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> Objective:
    """T5 span-corruption rows for an encoder-decoder model (gin: `span_corruption.*`).

    As T5's `span_corruption`: documents (each ending in EOS) are concatenated and cut into chunks
    of `span_corruption_lengths(seq_len)[0]` tokens -- the packer's rows, so no token is dropped
    -- and each chunk is corrupted by `corrupt_spans`. Its inputs then fill the `seq_len`-token
    encoder row (at most one padding token from rounding) and its targets the decoder row.

    Row fields: encoder_inputs/encoder_segment_ids/encoder_positions [seq_len];
    decoder_inputs (targets shifted right, start token PAD_ID), targets, loss_mask,
    decoder_segment_ids, decoder_positions, target_span_ids [targets_len]. The last chunk of a
    finite pass may be shorter (its rows are padded, segment id 0).
    """
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"span_corruption.noise_density={noise_density} must be in (0, 1).")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"span_corruption.mean_noise_span_length={mean_noise_span_length} must be "
                         ">= 1.")

    row_length: dict[int, int] = {}  # chunk length -> the seq_len it was computed for

    def lengths(seq_len: int) -> dict[str, int]:
        raw, _ = span_corruption_lengths(seq_len, noise_density, mean_noise_span_length)
        noise, spans = span_counts(raw, noise_density, mean_noise_span_length)
        if natural_span_count(raw, noise_density, mean_noise_span_length) < 1:
            need = min_span_corruption_seq_len(noise_density, mean_noise_span_length)
            raise ValueError(
                f"seq_len={seq_len} is too short for span corruption with noise_density="
                f"{noise_density} and mean_noise_span_length={mean_noise_span_length}: a chunk "
                f"of {raw} tokens holds round({raw} * {noise_density}) = "
                f"{int(round(raw * noise_density))} noise tokens, less than one span of mean "
                f"length {mean_noise_span_length}. Use seq_len >= {need} (gin: "
                "`TrainConfig.seq_len`) or raise the noise density.")
        if spans > vocab.extra_ids:
            raise ValueError(
                f"seq_len={seq_len} needs {spans} sentinel ids (noise_density={noise_density}, "
                f"mean_noise_span_length={mean_noise_span_length}) but the vocabulary has only "
                f"{vocab.extra_ids} extra ids. Raise `pretrain_mlm.extra_ids` to >= {spans} or "
                "lower `TrainConfig.seq_len`.")
        row_length[raw] = seq_len
        return {"targets": raw}

    def post_pack(f: Features, rng: np.random.Generator) -> Features:
        raw = len(f["targets"])
        if raw not in row_length:
            lengths(_largest_seq_len(raw))
        seq_len = row_length[raw]
        targets_len = span_corruption_lengths(seq_len, noise_density, mean_noise_span_length)[1]
        n = int(np.sum(f["targets_segment_ids"] > 0))  # valid tokens come first
        enc = np.zeros(seq_len, np.int32)
        tgt = np.zeros(targets_len, np.int32)
        span_ids = np.zeros(targets_len, np.int32)
        enc_n = dec_n = 0
        if n:
            noise = random_spans_noise_mask(n, rng, noise_density, mean_noise_span_length)
            i, t, s = corrupt_spans(f["targets"][:n].astype(np.int32), noise, vocab)
            enc_n, dec_n = len(i), len(t)
            enc[:enc_n], tgt[:dec_n], span_ids[:dec_n] = i, t, s
        enc_seg = (np.arange(seq_len) < enc_n).astype(np.int32)
        dec_seg = (np.arange(targets_len) < dec_n).astype(np.int32)
        return {
            "encoder_inputs": enc, "encoder_segment_ids": enc_seg,
            "encoder_positions": (np.arange(seq_len) * enc_seg).astype(np.int32),
            "decoder_inputs": shift_right(tgt, dec_seg), "targets": tgt,
            "loss_mask": dec_seg.astype(np.float32), "decoder_segment_ids": dec_seg,
            "decoder_positions": (np.arange(targets_len) * dec_seg).astype(np.int32),
            "target_span_ids": span_ids,
        }

    def _largest_seq_len(raw: int) -> int:  # only for rows packed without calling `lengths`
        noise, spans = span_counts(raw, noise_density, mean_noise_span_length)
        seq_len = raw - noise + spans + 1
        while span_corruption_lengths(seq_len + 1, noise_density, mean_noise_span_length)[0] == raw:
            seq_len += 1
        return seq_len

    return Objective(name="span_corruption", lengths=lengths, post_pack=post_pack,
                     model="encoder_decoder")


# ----- prefix LM -------------------------------------------------------------------------------

def _prefix_lm_post_pack(f: Features, rng: np.random.Generator) -> Features:
    """Next-token rows plus `prefix` [seq_len] int32: 1 on the positions that attend
    bidirectionally. Each segment of L tokens gets a uniform prefix of p in [1, L-1] tokens
    (none if L == 1): input positions 0..p (start token + the prefix) see each other, the rest is
    causal, and only targets p..L-1 (the suffix) are scored."""
    row = _next_token_post_pack(f, rng)
    seg = row["segment_ids"]
    pos = row["positions"]
    starts = np.flatnonzero(_segment_starts(seg) & (seg > 0))
    ends = np.append(starts[1:], int(np.sum(seg > 0)))
    prefix_len = np.zeros(len(seg), np.int64)
    for s, e in zip(starts, ends):
        n = e - s
        prefix_len[s:e] = rng.integers(1, n) if n > 1 else 0
    row["prefix"] = ((pos <= prefix_len) & (prefix_len > 0) & (seg > 0)).astype(np.int32)
    row["loss_mask"] = (row["loss_mask"] * (pos >= prefix_len)).astype(np.float32)
    return row


PREFIX_LM = Objective(name="prefix_lm", lengths=lambda n: {"targets": n},
                      post_pack=_prefix_lm_post_pack)

OBJECTIVES[PREFIX_LM.name] = PREFIX_LM

# Objectives built from the vocabulary (and their own gin settings) when the run starts.
VOCAB_OBJECTIVES: dict[str, Callable[[VocabInfo], Objective]] = {
    "bert_mlm": bert_mlm, "span_corruption": span_corruption}
