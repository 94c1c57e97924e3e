"""The masking objectives as pure numpy: BERT MLM proportions and 80/10/10 split, span corruption
exactness and statistics, prefix-LM rows, reproducibility through the grain pipeline, and the
errors for impossible settings."""

import json
import math

import numpy as np
import pytest

from llm.data import objectives as obj
from llm.data.pipeline import make_dataset, pad_row
from llm.data.tokenizer import load_tokenizer

V, EXTRA = 600, 100
VOCAB = obj.VocabInfo(size=V, extra_ids=EXTRA)
MASK = obj.bert_mask_id(VOCAB)


def packed_rows(n_rows: int, length: int, seed: int = 0, eos_every: int = 37):
    """Packed rows like the packer's: several segments (documents ending in EOS), a padded tail
    on some rows."""
    rng = np.random.default_rng(seed)
    for r in range(n_rows):
        tokens = rng.integers(obj.FIRST_REGULAR_ID, VOCAB.regular_end, length).astype(np.int32)
        seg = np.ones(length, np.int32)
        cuts = np.sort(rng.choice(np.arange(1, length), 2, replace=False))
        seg[cuts[0]:] = 2
        seg[cuts[1]:] = 3
        tokens[cuts - 1] = obj.EOS_ID
        if r % 4 == 3:  # a final partial row: padding at the end
            seg[length - 10:] = 0
            tokens[length - 10:] = obj.PAD_ID
        starts = np.concatenate([[0], cuts])
        pos = np.arange(length) - starts[np.searchsorted(starts, np.arange(length), "right") - 1]
        yield {"targets": tokens, "targets_segment_ids": seg,
               "targets_positions": np.where(seg > 0, pos, 0).astype(np.int32)}


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    half = sigmas * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


# ----- BERT ---------------------------------------------------------------------------------

def test_bert_selection_rate_and_80_10_10_split():
    objective = obj.get_objective("bert_mlm", VOCAB)
    rng = np.random.default_rng(0)
    eligible = selected = masked = randomized = kept = 0
    for f in packed_rows(400, 128):
        row = objective.post_pack(f, rng)
        ok = (f["targets_segment_ids"] > 0) & (f["targets"] >= obj.FIRST_REGULAR_ID)
        sel = row["loss_mask"] > 0
        # Never padding or special tokens; the targets are the original tokens.
        assert not np.any(sel & ~ok)
        np.testing.assert_array_equal(row["targets"], f["targets"])
        np.testing.assert_array_equal(row["inputs"][~sel], f["targets"][~sel])
        eligible += ok.sum()
        selected += sel.sum()
        masked += np.sum(sel & (row["inputs"] == MASK))
        kept += np.sum(sel & (row["inputs"] == f["targets"]))
        randomized += np.sum(sel & (row["inputs"] != MASK) & (row["inputs"] != f["targets"]))
        # Random replacements are regular tokens, never special ids or sentinels.
        rand = row["inputs"][sel & (row["inputs"] != MASK)]
        assert np.all((rand >= obj.FIRST_REGULAR_ID) & (rand < VOCAB.regular_end))
    rate, mask_share = selected / eligible, masked / selected
    # A random replacement equals the original with probability 1 / (regular ids): counted as
    # kept, so the expected shares are adjusted by that.
    same = 1 / (VOCAB.regular_end - obj.FIRST_REGULAR_ID)
    print(f"\nBERT: {eligible} eligible tokens, selected {rate:.4f}; of the selected "
          f"{mask_share:.4f} [MASK], {randomized / selected:.4f} random, {kept / selected:.4f} "
          "unchanged")
    lo, hi = binomial_bounds(eligible, 0.15)
    assert lo < rate < hi
    lo, hi = binomial_bounds(selected, 0.8)
    assert lo < mask_share < hi
    lo, hi = binomial_bounds(selected, 0.1 * (1 - same))
    assert lo < randomized / selected < hi
    lo, hi = binomial_bounds(selected, 0.1 + 0.1 * same)
    assert lo < kept / selected < hi


def test_bert_whole_word_masks_words_together(tiny_data):
    tok = load_tokenizer(f"{tiny_data}/tokenizer.model", extra_ids=4)
    vocab = obj.VocabInfo.from_tokenizer(tok)
    text = "def parse_header_value(header_value, strict=True):\n    return header_value\n" * 20
    ids = np.asarray(tok.encode(text), np.int32)
    seg = np.ones_like(ids)
    # Word boundaries of this text: a new word starts where the pieces do not touch.
    continues = (vocab.joins_right[ids[:-1]] & vocab.joins_left[ids[1:]])
    word = np.concatenate([[0], np.cumsum(~continues)])
    assert word[-1] + 1 < len(ids)  # some words span several tokens
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, sel = obj.bert_masking(ids, seg, rng, vocab, whole_word=True)
        for w in np.unique(word[sel]):
            assert sel[word == w].all(), "a word was masked only partly"
    token_level = [obj.bert_masking(ids, seg, rng, vocab)[1] for _ in range(50)]
    assert any(len(np.unique(sel[word == w])) == 2 for sel in token_level
               for w in np.unique(word)), "token-level masking should split some words"


def test_bert_needs_a_mask_id():
    with pytest.raises(ValueError, match="0 extra ids"):
        obj.get_objective("bert_mlm", obj.VocabInfo(size=V, extra_ids=0))
    with pytest.raises(ValueError, match="needs the vocabulary"):
        obj.get_objective("bert_mlm")


# ----- span corruption -------------------------------------------------------------------------

def test_span_lengths_match_t5():
    # T5's random_spans_helper(512, 0.15, 3.0) -> (568, 114).
    assert obj.span_corruption_lengths(512) == (568, 114)


@pytest.mark.parametrize("seq_len", [16, 64, 512])
def test_span_corruption_reconstructs_exactly_and_fills_rows(seq_len):
    objective = obj.get_objective("span_corruption", VOCAB)
    raw = objective.lengths(seq_len)["targets"]
    rng = np.random.default_rng(seq_len)
    noise = spans = chunks = 0
    span_lengths = []
    for f in packed_rows(60, raw, seed=seq_len, eos_every=5):
        row = objective.post_pack(f, rng)
        assert row["encoder_inputs"].shape == (seq_len,)
        n = int(np.sum(f["targets_segment_ids"] > 0))
        if n == raw:  # a full chunk fills the encoder row (rounding may leave one slot)
            assert row["encoder_segment_ids"].sum() >= seq_len - 1
        rebuilt = obj.fill_spans(row["encoder_inputs"], row["targets"], VOCAB)
        np.testing.assert_array_equal(rebuilt, f["targets"][:n])
        # decoder inputs are the targets shifted right behind the start token 0
        dec = row["decoder_segment_ids"] > 0
        np.testing.assert_array_equal(row["decoder_inputs"][1:][dec[1:]],
                                      row["targets"][:-1][dec[1:]])
        assert row["decoder_inputs"][0] == obj.PAD_ID
        ids = row["target_span_ids"]
        noise += np.sum(ids > 0)
        spans += len(np.unique(ids[ids > 0]))
        span_lengths += list(np.bincount(ids[ids > 0])[1:])
        chunks += n
    density, mean_len = noise / chunks, noise / spans
    print(f"\nseq_len {seq_len}: chunk {raw}, noise density {density:.4f}, mean span length "
          f"{mean_len:.3f}")
    # Rounding per chunk: |density - 0.15| <= 0.5 / chunk, |mean - 3| <= 1.5 / spans per chunk.
    assert abs(density - 0.15) <= 0.5 / (raw - 10) + 1e-9
    per_chunk_spans = spans / 60
    assert abs(mean_len - 3.0) <= 1.5 / per_chunk_spans + 0.05
    assert min(span_lengths) >= 1


def test_noise_mask_statistics_over_many_chunks():
    rng = np.random.default_rng(0)
    masks = [obj.random_spans_noise_mask(568, rng, 0.15, 3.0) for _ in range(200)]
    m = np.stack(masks)
    assert np.all(m.sum(1) == 85)  # round(568 * 0.15): exact per chunk
    starts = m & ~np.concatenate([np.zeros((200, 1), bool), m[:, :-1]], axis=1)
    assert np.all(starts.sum(1) == 28)  # round(85 / 3)
    assert not m[:, 0].any()  # T5 layout: a non-noise span first
    # Span starts are spread over the whole chunk, not clustered.
    first_half = starts[:, :284].sum() / starts.sum()
    assert 0.45 < first_half < 0.55


def test_span_corruption_bad_settings_name_both_numbers():
    with pytest.raises(ValueError, match=r"needs 14 sentinel ids.*only 8 extra ids"):
        obj.get_objective("span_corruption", obj.VocabInfo(V, 8)).lengths(256)
    with pytest.raises(ValueError, match=r"seq_len=8 is too short.*noise_density=0.15.*"
                                         r"seq_len >= 10"):
        obj.get_objective("span_corruption", VOCAB).lengths(8)


def test_pad_rows_are_empty():
    for name in ("bert_mlm", "span_corruption", "prefix_lm"):
        row = pad_row(obj.get_objective(name, VOCAB), 64)
        assert all(not v.any() for v in row.values()), name


# ----- prefix LM ------------------------------------------------------------------------------

def test_prefix_lm_rows():
    objective = obj.get_objective("prefix_lm")
    rng = np.random.default_rng(0)
    prefix_lengths = []
    for f in packed_rows(50, 96):
        row = objective.post_pack(f, rng)
        seg, pos = row["segment_ids"], row["positions"]
        for s in np.unique(seg[seg > 0]):
            in_seg = seg == s
            p = row["prefix"][in_seg]
            if in_seg.sum() == 1:  # a one-token document has no prefix and is scored
                assert p.sum() == 0 and row["loss_mask"][in_seg].sum() == 1
                continue
            k = int(p.sum()) - 1  # prefix tokens: input positions 0..k are bidirectional
            assert 1 <= k < in_seg.sum()
            assert np.all(p[:k + 1] == 1) and np.all(p[k + 1:] == 0)
            # loss exactly on the suffix: targets k.. of the document
            np.testing.assert_array_equal(row["loss_mask"][in_seg], pos[in_seg] >= k)
            prefix_lengths.append(k / in_seg.sum())
        assert not row["prefix"][seg == 0].any() and not row["loss_mask"][seg == 0].any()
    assert 0.35 < np.mean(prefix_lengths) < 0.65  # uniform split point


# ----- through the grain pipeline -------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert_mlm", "span_corruption"])
def test_masks_are_reproducible_and_survive_restore(name, tiny_data):
    tok = load_tokenizer(f"{tiny_data}/tokenizer.model", extra_ids=16)
    objective = obj.get_objective(name, obj.VocabInfo.from_tokenizer(tok))

    def dataset(seed=0):
        return make_dataset(tiny_data, "train", seq_len=64, global_batch_size=4, seed=seed,
                            objective=objective, process_index=0, process_count=1)

    it = iter(dataset())
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(3)]
    again = iter(dataset())
    for a, b in zip(first, [next(again) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    restored = iter(dataset())
    restored.set_state(state)
    for a, b in zip(after, [next(restored) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    other = next(iter(dataset(seed=1)))
    key = "inputs" if name == "bert_mlm" else "encoder_inputs"
    assert not np.array_equal(other[key], first[0][key])  # the seed matters
