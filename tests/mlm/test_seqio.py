"""seqio interop: our vocabulary's sentinels are seqio's, our sources register as a seqio Task
whose tokens equal our prepared shards, and a seqio Task's examples become a data directory our
grain pipeline and objectives read."""

import numpy as np
import pytest

from llm.data import objectives, shards, sources
from llm.data.pipeline import make_dataset
from llm.data.tokenizer import load_tokenizer
from tests.conftest import STDLIB_EMAIL

seqio = pytest.importorskip("seqio")


@pytest.fixture(scope="module")
def task(tiny_data):
    from llm.data.seqio_tasks import register_task

    tok = load_tokenizer(shards.load_dataset_info(tiny_data).tokenizer_path, extra_ids=16)
    return register_task("llm_test_email", tok, validation_fraction=0.2,
                         corpus_fn=lambda: sources.text_files(STDLIB_EMAIL))


def test_sentinels_match_seqio(tiny_data):
    tok = load_tokenizer(shards.load_dataset_info(tiny_data).tokenizer_path, extra_ids=16)
    vocab, ours = tok.to_seqio(), objectives.VocabInfo.from_tokenizer(tok)
    assert vocab.vocab_size == ours.size
    for i in (0, 1, 15):
        assert vocab.decode([ours.extra_id(i)]).strip() == f"<extra_id_{i}>"


def test_task_tokens_equal_prepared_shards(task, tiny_data):
    info = shards.load_dataset_info(tiny_data)
    ours = shards.read_all(info.shard_paths("validation"))
    theirs = [ex["targets"] for ex in task.get_dataset(
        None, split="validation", shuffle=False, use_cached=False).as_numpy_iterator()]
    assert len(theirs) == len(ours) == info.splits["validation"].num_documents
    for a, b in zip(theirs, ours):
        np.testing.assert_array_equal(a, b)


def test_seqio_task_feeds_our_pipeline(task, tmp_path):
    from llm.data.seqio_tasks import seqio_to_dataset
    from llm.train.experiment import prepare_on_one_process

    data_dir = str(tmp_path)
    info = seqio_to_dataset("llm_test_email", data_dir, num_shards=2)
    assert info.splits["validation"].num_documents > 0
    # The experiments use it as it is (they would otherwise re-prepare the configured corpus).
    assert prepare_on_one_process(data_dir).fingerprint == info.fingerprint
    tok = load_tokenizer(info.tokenizer_path, extra_ids=16)
    vocab = objectives.VocabInfo.from_tokenizer(tok)
    objective = objectives.get_objective("span_corruption", vocab)
    batch = next(iter(make_dataset(data_dir, "train", seq_len=64, global_batch_size=2, seed=0,
                                   objective=objective, process_index=0, process_count=1)))
    row = {k: v[0] for k, v in batch.items()}
    text = tok.decode(objectives.fill_spans(row["encoder_inputs"], row["targets"], vocab))
    assert len(text) > 50 and text in "".join(d.text for d in sources.text_files(STDLIB_EMAIL))
