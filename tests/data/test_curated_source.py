"""`corpus.name='curated'`: prepare reads tools/curate's kept shards directly (ArrayRecord or
JSONL.gz), ids and metadata intact; bad records and paths are one-line errors; the CLI exits 2."""

import gzip
import json
import os
import subprocess
import sys

import pytest
from array_record.python import array_record_module

from llm.data import sources
from tests.conftest import REPO

RECORDS = [{"id": f"web/{i}", "text": f"Document {i} text.\n", "source": "web",
            "metadata": {"domain": ["web", "code"][i % 2], "language": "en"}} for i in range(7)]


def write_kept(out, records, array_record=True, jsonl=True):
    kept = os.path.join(out, "kept")
    os.makedirs(kept)
    for part, recs in enumerate((records[:4], records[4:])):
        lines = [json.dumps(r, sort_keys=True) for r in recs]
        if jsonl:
            with gzip.open(os.path.join(kept, f"part-{part:06d}.jsonl.gz"), "wt") as f:
                f.write("".join(x + "\n" for x in lines))
        if array_record:
            w = array_record_module.ArrayRecordWriter(
                os.path.join(kept, f"part-{part:06d}.array_record"), "group_size:1")
            for x in lines:
                w.write(x.encode())
            w.close()
    return out


@pytest.mark.parametrize("array_record", [True, False])
def test_reads_kept_shards_with_ids_and_metadata(tmp_path, array_record):
    out = write_kept(str(tmp_path), RECORDS, array_record=array_record)
    corpus = sources.curated(out)
    suffix = ".array_record" if array_record else ".jsonl.gz"
    assert [os.path.basename(u.path) for u in corpus.units] == \
        [f"part-00000{k}{suffix}" for k in range(2)]
    docs = list(corpus)
    assert [(d.id, d.text, d.source, d.metadata) for d in docs] == \
        [(r["id"], r["text"], r["source"], r["metadata"]) for r in RECORDS]
    assert [d.id for d in sources.curated(os.path.join(out, "kept"))] == [d.id for d in docs]


def test_bad_curated_input(tmp_path):
    with pytest.raises(sources.DataError, match=r"No curated shards.*curated\.path"):
        sources.curated(str(tmp_path))
    out = write_kept(str(tmp_path / "bad"), [{"id": "x", "text": None}] * 5, jsonl=False)
    with pytest.raises(sources.DataError, match=r"part-000000\.array_record record 0 is not a "
                                                r"record written by tools/curate"):
        list(sources.curated(out))


def test_cli_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.prepare_data", f"--data_dir={tmp_path / 'd'}",
         "--gin_param=corpus.name='curated'", f"--gin_param=curated.path='{tmp_path}'"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "curated.path" in lines[0] and "Traceback" not in proc.stderr
