"""Bad input is counted under its own reason; nothing crashes, nothing is silently lost."""

import gzip
import json
import os

import gin
import pytest

from llm.data.curate.readers import ReadLimits, Unit, read_unit
from llm.data.curate.records import Rejected
from llm.data.curate.run import curate
from tests.curate.corpus import prose, vocab


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _good(i: int) -> str:
    import random
    return prose(random.Random(i), vocab())


def test_every_bad_input_is_counted(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.txt").write_text(_good(1))
    (d / "invalid_utf8.txt").write_bytes(b"caf\xe9 \xff\xfe" * 50)           # mostly broken
    (d / "repairable.txt").write_bytes(_good(2).encode() + b" \xff ok")      # one bad byte
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 40)
    with open(d / "huge.txt", "wb") as f:                                     # 50 MB document
        f.write(b"word " * (10 * 1024 * 1024))
    j = tmp_path / "j"
    j.mkdir()
    lines = [json.dumps({"text": _good(3)}), "{not json", json.dumps({"body": "no text"}),
             json.dumps({"text": None}), json.dumps({"text": ["a", "list"]}),
             json.dumps({"text": _good(4)})]
    (j / "a.jsonl").write_text("\n".join(lines) + "\n")
    data = gzip.compress(("\n".join(json.dumps({"text": _good(i)}) for i in range(5, 25))
                          + "\n").encode())
    (j / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])
    (j / "empty.jsonl").write_bytes(b"")
    ds = curate(out_dir=str(tmp_path / "out"), quiet=True, steps=["normalize"],
                sources=[{"kind": "files", "path": str(d)},
                         {"kind": "jsonl", "path": str(j / "*.jsonl*")}])
    read = ds["steps"][0]
    assert read["step"] == "read"
    assert read["removed"] == {"invalid_utf8": 1, "empty_file": 2, "binary_file": 1,
                               "too_large": 1, "malformed_json": 1, "missing_text_field": 1,
                               "missing_text": 1, "bad_record": 1, "corrupt_compressed": 1}
    assert ds["corrupt_files"]["count"] == 1
    assert ds["corrupt_files"]["where"][0].startswith(str(j / "truncated.jsonl.gz:after-line-"))
    a = ds["accounting"]
    assert a["ok"] and a["input"] == a["kept_unique"] + a["removed"]
    # good.txt, repairable.txt, 2 good JSONL lines, and the truncated gzip's complete lines
    assert a["kept_unique"] >= 4 + 1
    kept = []
    for name in sorted(os.listdir(tmp_path / "out" / "kept")):
        if name.endswith(".jsonl.gz"):
            with gzip.open(tmp_path / "out" / "kept" / name, "rt") as f:
                kept += [json.loads(x) for x in f]
    assert any("\ufffd" in r["text"] and r["metadata"]["utf8_repaired_bytes"] == 1 for r in kept)
    assert (tmp_path / "out" / "removed" / "read.too_large.jsonl").exists()


def test_large_jsonl_line_and_zstd(tmp_path):
    zstd = pytest.importorskip("zstandard")
    p = tmp_path / "big.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps({"text": "x " * 3_000_000}) + "\n")
        f.write(json.dumps({"text": "small doc"}) + "\n")
    recs = list(read_unit(Unit("jsonl", "s", "web", (str(p),)), ReadLimits(max_doc_bytes=1000)))
    assert isinstance(recs[0], Rejected) and recs[0].reason == "too_large"
    assert recs[1].text == "small doc"
    z = tmp_path / "a.jsonl.zst"
    z.write_bytes(zstd.ZstdCompressor().compress(b'{"text": "hello zstd"}\n'))
    (doc,) = read_unit(Unit("jsonl", "s", "web", (str(z),)))
    assert doc.text == "hello zstd" and doc.metadata["domain"] == "web"


def test_parquet_source_and_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["def f():\n    return 1\n", None],
                             "repo": ["a/b", "c/d"]}), tmp_path / "c.parquet")
    recs = list(read_unit(Unit("parquet", "code", "code", (str(tmp_path / "c.parquet"),),
                               (("text_field", "content"),))))
    assert recs[0].metadata["repo"] == "a/b" and recs[0].metadata["domain"] == "code"
    assert isinstance(recs[1], Rejected) and recs[1].reason == "missing_text"


def test_misconfigured_source_names_the_fix(tmp_path):
    from llm.data.curate.records import CurationError

    with pytest.raises(CurationError, match="No files match"):
        curate(out_dir=str(tmp_path), sources=[{"kind": "jsonl", "path": "/nonexistent/*.x"}])
    with pytest.raises(CurationError, match="kind"):
        curate(out_dir=str(tmp_path), sources=[{"kind": "csv", "path": "x"}])
    with pytest.raises(CurationError, match="Unknown option.*text_feild"):
        curate(out_dir=str(tmp_path), sources=[{"kind": "jsonl", "path": __file__,
                                                "text_feild": "body"}])
    with pytest.raises(CurationError, match="Unknown curation steps"):
        curate(out_dir=str(tmp_path), steps=["normalise"])


def test_cli_summary_reports_a_truncated_gzip(tmp_path, capsys):
    from tools.curate import main

    data = gzip.compress(("\n".join(json.dumps({"text": _good(i)}) for i in range(30))
                          + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": None}) + "\n"
                                       + json.dumps({"text": _good(99)}) + "\n")
    src = [{"kind": "jsonl", "path": str(tmp_path / "*.jsonl*")}]
    rc = main(["--out_dir", str(tmp_path / "out"), "--gin_param", f"curate.sources={src!r}",
               "--gin_param", "curate.steps=['normalize']", "--gin_param", "curate.quiet=True"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 compressed input file(s) corrupt or truncated" in out
    assert "cut.jsonl.gz:after-line-" in out and "unknown number of documents" in out
    ds = json.loads((tmp_path / "out" / "datasheet.json").read_text())
    assert ds["steps"][0]["removed"]["missing_text"] == 1
    assert "corrupt or truncated" in (tmp_path / "out" / "datasheet.md").read_text()


@pytest.mark.parametrize("binding, words", [
    ("minhash.survivor=('pagerank',)", ["minhash.survivor", "pagerank", "choose from"]),
    ("c4.mode='spacy'", ["c4.mode", "spacy", "native", "datatrove"]),
    ("pii.ip_scope='private'", ["pii.ip_scope", "private", "public", "all"]),
])
def test_cli_bad_new_settings_are_one_line_errors(tmp_path, capsys, binding, words):
    from tools.curate import main

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": _good(1)}) + "\n")
    src = [{"kind": "jsonl", "path": str(tmp_path / "a.jsonl")}]
    rc = main(["--out_dir", str(tmp_path / "out"), "--gin_param", f"curate.sources={src!r}",
               "--gin_param", binding, "--gin_param", "curate.quiet=True"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words), err
