"""Curation on Apache Beam with the DirectRunner in 2 processes
(`--direct_running_mode=multi_processing --direct_num_workers=2`), so every function and every
element crosses a process boundary as on Dataflow, Flink or Spark (the in-process DirectRunner
hides serialization bugs): same datasheet and byte-identical kept shards as the local runner."""

import gin
import pytest

from llm.data.curate.run import curate
from tests.curate.corpus import web_corpus
from tests.curate.test_pipeline import _outputs

pytestmark = pytest.mark.slow

BEAM_MULTIPROCESS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_local_and_beam_multiprocess_identical(tmp_path):
    pytest.importorskip("apache_beam")
    # gin bindings live in the driver only: the plan must carry them to the workers
    gin.bind_parameter("boilerplate.min_docs", 3)
    gin.bind_parameter("balance.bucket_by", ["domain"])
    gin.bind_parameter("balance.temperature", 3.0)
    src = web_corpus(str(tmp_path / "in"))
    sources = [{"kind": "jsonl", "path": src.replace("*", "0"), "domain": "books"},
               {"kind": "jsonl", "path": src.replace("*", "[12]"), "domain": "web"}]
    steps = ["normalize", "boilerplate", "exact_dedup", "gopher_quality", "pii",
             "minhash_dedup", "balance"]
    local = curate(out_dir=str(tmp_path / "local"), quiet=True, steps=steps, sources=sources)
    beam = curate(out_dir=str(tmp_path / "beam"), quiet=True, steps=steps, sources=sources,
                  runner="beam", beam_options=BEAM_MULTIPROCESS)
    assert local == beam
    assert _outputs(str(tmp_path / "local")) == _outputs(str(tmp_path / "beam"))
    by_step = {s["step"]: s for s in local["steps"]}
    assert by_step["boilerplate"]["changes"]["lines_removed"] > 0
    assert by_step["exact_dedup"]["removed"] and by_step["minhash_dedup"]["removed"]
    assert by_step["balance"]["removed"]["balance_downsampled"] > 0
