"""End to end: accounting, worker-count independence, resume, local vs Beam DirectRunner."""

import gzip
import hashlib
import json
import os

import gin
import numpy as np
import pytest

from llm.data.curate import datasheet, minhash
from llm.data.curate.records import CurationError
from llm.data.curate.run import curate
from llm.data.sources import Document
from tests.curate.corpus import web_corpus

STEPS = ["normalize", "boilerplate", "exact_dedup", "gopher_quality", "gopher_repetition", "c4",
         "fineweb", "langid", "toxicity", "pii", "decontam", "minhash_dedup"]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    gin.bind_parameter("boilerplate.min_docs", 3)
    yield
    gin.clear_config()


def _outputs(out: str) -> dict[str, str]:
    d = os.path.join(out, "kept")
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(d))}


def _kept(out: str) -> list[dict]:
    recs = []
    d = os.path.join(out, "kept")
    for n in sorted(os.listdir(d)):
        if n.endswith(".jsonl.gz"):
            with gzip.open(os.path.join(d, n), "rt") as f:
                recs += [json.loads(x) for x in f]
    return recs


def _run(tmp, name, **kw):
    src = web_corpus(str(tmp / "in"))
    return curate(out_dir=str(tmp / name), quiet=True, steps=kw.pop("steps", STEPS),
                  sources=[{"kind": "jsonl", "path": src, "name": "web"}], **kw)


def test_pipeline_accounting_and_outputs(tmp_path):
    ds = _run(tmp_path, "out")
    a = ds["accounting"]
    assert a["ok"] and a["input"] == 48 and a["input"] == a["kept_unique"] + a["removed"]
    steps = {s["step"]: s for s in ds["steps"]}
    assert steps["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert steps["minhash_dedup"]["removed"] == {"near_duplicate": 1}
    assert steps["boilerplate"]["changes"]["lines_removed"] == 24
    assert steps["pii"]["changes"] == {"EMAIL": 1, "PHONE": 1}
    for prev, cur in zip(ds["steps"], ds["steps"][1:]):
        assert cur["in"] == prev["out"]
    kept = _kept(str(tmp_path / "out"))
    assert len(kept) == a["kept_unique"]
    assert all("Subscribe now" not in r["text"] for r in kept)
    assert any("<EMAIL>" in r["text"] for r in kept)
    assert all(r["metadata"]["language"] == "en" for r in kept)
    md = (tmp_path / "out" / "datasheet.md").read_text()
    for section in ("## Motivation", "## Composition", "## Collection process",
                    "## Preprocessing / cleaning", "## Uses", "## Distribution",
                    "## Maintenance"):
        assert section in md
    from array_record.python.array_record_module import ArrayRecordReader

    ar = sorted(n for n in os.listdir(tmp_path / "out" / "kept") if n.endswith(".array_record"))
    n = 0
    for name in ar:
        r = ArrayRecordReader(str(tmp_path / "out" / "kept" / name))
        n += r.num_records()
        json.loads(r.read([0])[0])
        r.close()
    assert n == len(kept)


def test_accounting_mismatch_is_an_error():
    t = {"input": 10, "kept": 7, "copies": 0, "removed": {"read": {"x": 2}}}
    with pytest.raises(CurationError, match="Accounting mismatch"):
        datasheet.check_accounting(t)


def test_one_and_two_workers_identical(tmp_path):
    a = _run(tmp_path, "w1", workers=1)
    b = _run(tmp_path, "w2", workers=2)
    assert _outputs(str(tmp_path / "w1")) == _outputs(str(tmp_path / "w2"))
    assert a == b


def test_resume_after_crash_in_minhash(tmp_path, monkeypatch):
    clean = _run(tmp_path, "clean")
    real = minhash.analyze
    calls = []

    def crashing(docs, cfg=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")  # the run dies mid-stage
        return real(docs, cfg or minhash.MinHashConfig())

    monkeypatch.setattr(minhash, "analyze", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "crash")
    sig_dir = [d for d in os.listdir(tmp_path / "crash" / "_work") if "minhash" in d
               and not d.endswith(".msgpack")][0]
    done = [n for n in os.listdir(tmp_path / "crash" / "_work" / sig_dir) if n.endswith(".done")]
    assert len(done) == 2                                             # 2 of 3 units finished
    calls.clear()
    monkeypatch.setattr(minhash, "analyze", real)
    resumed = _run(tmp_path, "crash")
    assert resumed == clean
    assert _outputs(str(tmp_path / "crash")) == _outputs(str(tmp_path / "clean"))
    run = json.loads((tmp_path / "crash" / "run.json").read_text())
    assert run["resumed_units"] >= 2 + 3 + 3    # read, boilerplate, exact stages + 2 signatures


def test_changed_config_refuses_to_resume(tmp_path):
    _run(tmp_path, "out", steps=["normalize"])
    with pytest.raises(CurationError, match="different config"):
        _run(tmp_path, "out", steps=["normalize", "pii"])
    ds = _run(tmp_path, "out", steps=["normalize", "pii"], restart=True)
    assert ds["accounting"]["ok"]


def test_local_and_beam_direct_runner_identical(tmp_path):
    pytest.importorskip("apache_beam")
    gin.bind_parameter("balance.bucket_by", ["domain"])
    gin.bind_parameter("balance.temperature", 3.0)
    src = web_corpus(str(tmp_path / "in"))
    sources = [{"kind": "jsonl", "path": src.replace("*", "0"), "domain": "books"},
               {"kind": "jsonl", "path": src.replace("*", "[12]"), "domain": "web"}]
    steps = ["normalize", "boilerplate", "exact_dedup", "gopher_quality", "pii",
             "minhash_dedup", "balance"]
    local = curate(out_dir=str(tmp_path / "local"), quiet=True, steps=steps, sources=sources)
    beam = curate(out_dir=str(tmp_path / "beam"), quiet=True, steps=steps, sources=sources,
                  runner="beam")   # 2 worker processes: tests/curate/test_beam_multiprocess.py
    assert local == beam
    assert _outputs(str(tmp_path / "local")) == _outputs(str(tmp_path / "beam"))
    by_step = {s["step"]: s for s in local["steps"]}
    assert by_step["boilerplate"]["changes"]["lines_removed"] > 0
    assert by_step["exact_dedup"]["removed"] and by_step["minhash_dedup"]["removed"]
    assert by_step["balance"]["removed"]["balance_downsampled"] > 0
    assert local["accounting"]["balance_copies_added"] > 0


_CHILD = """
import sys, time
import gin
from llm.data.curate import minhash
from llm.data.curate.run import curate
real = minhash.analyze
calls = []
def slow(docs, cfg=None):
    calls.append(1)
    if len(calls) == 3:
        time.sleep(600)          # the parent SIGKILLs us here
    return real(docs, cfg or minhash.MinHashConfig())
minhash.analyze = slow
gin.bind_parameter("boilerplate.min_docs", 3)
curate(out_dir=sys.argv[1], quiet=True, steps=sys.argv[3].split(","),
       sources=[{"kind": "jsonl", "path": sys.argv[2], "name": "web"}])
"""


def test_resume_after_sigkill_in_minhash(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = web_corpus(str(tmp_path / "in"))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), src, ",".join(STEPS)])
    deadline = time.time() + 120
    sig_dir = None
    while time.time() < deadline:
        dirs = [d for d in (os.listdir(out / "_work") if (out / "_work").exists() else [])
                if "minhash" in d and not d.endswith(".msgpack")]
        if dirs:
            sig_dir = out / "_work" / dirs[0]
            if len([n for n in os.listdir(sig_dir) if n.endswith(".done")]) == 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sig_dir is not None and not (out / "datasheet.json").exists()
    resumed = _run(tmp_path, "killed")
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_units"] == 3 * 3 + 2     # 3 finished passes x 3 units + 2 signatures
    clean = _run(tmp_path, "clean")
    assert resumed == clean
    assert _outputs(str(out)) == _outputs(str(tmp_path / "clean"))


def test_work_files_are_versioned_msgpack_never_pickles(tmp_path):
    from llm.data.curate import workfile

    out = tmp_path / "out"
    src = [{"kind": "jsonl", "path": web_corpus(str(tmp_path / "in"), n=12)}]
    steps = ["normalize", "exact_dedup", "minhash_dedup"]
    first = curate(out_dir=str(out), quiet=True, steps=steps, sources=src)
    files = [os.path.join(d, f) for d, _, fs in os.walk(out / "_work") for f in fs]
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)
    for f in files:
        if f.endswith(".msgpack") or f.endswith(".stats"):
            with open(f, "rb") as fh:
                assert fh.read(len(workfile.MAGIC) + 1) == workfile.MAGIC + bytes([2])
    # a round trip keeps arrays, tuples, sets and documents
    doc = Document("d", "text", "s", {"k": [1, 2], "n": None})
    obj = {"a": np.arange(5, dtype=np.uint64), "t": (1, "x"), "s": {3, 1}, 5: [doc]}
    assert workfile.loads(workfile.dumps(obj)).keys() == obj.keys()
    back = workfile.loads(workfile.dumps(obj))
    assert back["a"].dtype == np.uint64 and back["a"].tolist() == [0, 1, 2, 3, 4]
    assert back["t"] == (1, "x") and back["s"] == {1, 3} and back[5] == [doc]
    # a pickle planted in the work dir is refused, never unpickled
    import pickle
    state = next(f for f in files if f.endswith(".state.msgpack"))
    with open(state, "wb") as fh:
        fh.write(pickle.dumps({"removed": []}))
    with pytest.raises(CurationError, match="not a curation work file"):
        curate(out_dir=str(out), quiet=True, steps=steps, sources=src)
    # a work dir of another format version is refused on resume, with the fix
    with open(out / "_work" / "fingerprint") as fh:
        fp = fh.read().split()[0]
    with open(out / "_work" / "fingerprint", "w") as fh:
        fh.write(fp)                                   # what format 1 (pickles) wrote
    with pytest.raises(CurationError, match="format version 1.*--restart"):
        curate(out_dir=str(out), quiet=True, steps=steps, sources=src)
    again = curate(out_dir=str(out), quiet=True, steps=steps, sources=src, restart=True)
    assert again["accounting"] == first["accounting"]
