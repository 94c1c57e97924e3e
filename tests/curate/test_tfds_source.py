"""TFDS source through the real tensorflow_datasets code path, offline (tfds mock data)."""

import sys

import pytest

from llm.data.curate.readers import plan_units, read_unit


def test_tfds_source_is_lazy_and_reads_offline():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        units = plan_units([{"kind": "tfds", "dataset": "imdb_reviews", "num_units": 2,
                             "domain": "reviews"}])
        assert [u.option("split") for u in units] == ["train[0%:50%]", "train[50%:100%]"]
        docs = list(read_unit(units[0]))
    assert len(docs) == 3
    assert all(isinstance(d.text, str) and d.metadata["domain"] == "reviews" for d in docs)
    assert all(d.metadata["label"] in (0, 1) for d in docs)
    assert docs[0].source == "tfds:imdb_reviews"


def test_readers_do_not_import_tensorflow():
    import subprocess

    code = ("import sys; from llm.data.curate import readers, run; "
            "assert 'tensorflow' not in sys.modules, 'TF imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
