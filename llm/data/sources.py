"""Text sources: the embedded standard-library corpus, text files, JSONL, and curation output.

Every source yields `Document`s with a stable `id` (used for the train/validation split and for
dedup bookkeeping) and a `source` name. Sources raise `DataError` with a message naming the
problem and the fix; they never return silently empty.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterable, Iterator

import gin


class DataError(ValueError):
    """Bad or missing input data. The message names the input and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One text document.

    id: stable identifier (a relative path or a record key); the split hash uses it.
    text: the document text (str, already decoded).
    source: name of the source it came from (e.g. "stdlib", "jsonl:/path").
    metadata: free-form extra fields (domain, url, language, ...).
    """

    id: str
    text: str
    source: str
    metadata: dict = dataclasses.field(default_factory=dict)


_TEST_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo"})


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


@gin.configurable
def embedded_corpus(include_tests: bool = False, include_docs: bool = True) -> Iterator[Document]:
    """The default corpus: the running Python's own standard library, on every machine.

    Yields every `.py` file under the stdlib directory (skipping `site-packages`, the
    machine-specific `_sysconfigdata*` build settings and, unless
    `include_tests`, test suites and demo code) followed by the English help topics shipped
    in `pydoc_data` (the text behind `help('for')` etc.). Files are visited in sorted order, so
    the corpus is deterministic for a given Python version.
    """
    root = stdlib_root()
    for path in embedded_files(include_tests):
        doc = embedded_file_document(path, root)
        if doc is not None:
            yield doc
    if include_docs:
        yield from pydoc_documents()


def embedded_files(include_tests: bool = False) -> list[pathlib.Path]:
    """The sorted `.py` files of the embedded corpus (see `embedded_corpus`)."""
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or rel.name.startswith("_sysconfigdata"):
            continue  # third-party packages; the interpreter's build settings (per machine)
        if not include_tests and _TEST_DIRS.intersection(rel.parts[:-1]):
            continue
        out.append(path)
    return out


def embedded_file_document(path: pathlib.Path, root: pathlib.Path | None = None
                           ) -> Document | None:
    """One stdlib file as a Document; None for undecodable or blank files (test fixtures)."""
    root = root or stdlib_root()
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a handful of stdlib files are deliberately non-UTF-8 test fixtures
    if not text.strip():
        return None
    rel = path.relative_to(root)
    return Document(id=f"stdlib/{rel.as_posix()}", text=text, source="stdlib",
                    metadata={"domain": "code", "language": "python"})


def pydoc_documents() -> Iterator[Document]:
    """The English help topics shipped in `pydoc_data` (the text behind `help('for')`)."""
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        yield Document(id=f"pydoc/{name}", text=text, source="pydoc",
                       metadata={"domain": "docs", "language": "en"})


@dataclasses.dataclass(frozen=True)
class Unit:
    """One input file of a file-based corpus: the unit that `prepare` reads in parallel, locally
    or on Beam workers (plain data, so it pickles across process boundaries).

    kind: "text" (the file is one document), "jsonl" (one document per line, `.gz` allowed),
      "curated" (a `tools/curate` kept shard: `.array_record` or `.jsonl.gz` records with id,
      text, source and metadata) or "canaries" (`llm.data.canaries`: secret canaries, training
      split only).
    """

    path: str
    kind: str
    text_field: str = "text"
    id_field: str | None = None
    encoding: str = "utf-8"


class UnitCorpus:
    """A corpus made of input files: iterating it reads the units in order (`read_unit`)."""

    def __init__(self, units: list[Unit]):
        self.units = list(units)

    def __iter__(self) -> Iterator[Document]:
        for unit in self.units:
            yield from read_unit(unit)


def read_unit(unit: Unit) -> Iterator[Document]:
    """The documents of one input file, in file order."""
    if unit.kind == "text":
        try:
            text = pathlib.Path(unit.path).read_text(encoding=unit.encoding)
        except UnicodeDecodeError as e:
            raise DataError(f"{unit.path} is not valid {unit.encoding} ({e.reason} at byte "
                            f"{e.start}). Fix the file, set `text_files.encoding`, or run it "
                            "through `tools/curate` which repairs or drops such files.") from None
        yield Document(id=unit.path, text=text, source=f"files:{unit.path}")
    elif unit.kind == "jsonl":
        opener = gzip.open if unit.path.endswith(".gz") else open
        with opener(unit.path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield jsonl_document(line, unit.path, lineno, unit.text_field, unit.id_field)
    elif unit.kind == "curated":
        yield from _curated_records(unit.path)
    elif unit.kind == "canaries":
        from llm.data.canaries import read_documents  # canaries imports this module

        yield from read_documents(unit.path)
    else:
        raise DataError(f"Unknown input kind {unit.kind!r} for {unit.path}.")


def _curated_document(raw: bytes | str, where: str) -> Document:
    try:
        r = json.loads(raw)
        if not isinstance(r.get("text"), str) or not isinstance(r.get("id"), str):
            raise ValueError("no string 'id' and 'text'")
    except (ValueError, AttributeError) as e:
        raise DataError(f"{where} is not a record written by tools/curate ({e}). Point "
                        "`curated.path` at a curation output directory.") from None
    return Document(id=r["id"], text=r["text"], source=r.get("source") or "curated",
                    metadata=r.get("metadata") or {})


def _curated_records(path: str, chunk: int = 256) -> Iterator[Document]:
    if path.endswith(".array_record"):
        from array_record.python import array_record_module

        reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
        try:
            n = reader.num_records()
            for start in range(0, n, chunk):
                for i, raw in enumerate(reader.read(start, min(n, start + chunk))):
                    yield _curated_document(raw, f"{path} record {start + i}")
        finally:
            reader.close()
    else:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _curated_document(line, f"{path}:{lineno}")


@gin.configurable
def text_files(pattern: str, encoding: str = "utf-8") -> UnitCorpus:
    """Every file matching a glob pattern (recursive `**` allowed), one document per file.

    A directory path is read as `<dir>/**/*`. Raises `DataError` if nothing matches or a file
    cannot be decoded.
    """
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"No files match {pattern!r}. Check the path, or point "
                        "`text_files.pattern` at an existing file, directory or glob.")
    return UnitCorpus([Unit(p, "text", encoding=encoding) for p in paths])


@gin.configurable
def jsonl(path: str, text_field: str = "text", id_field: str | None = None) -> UnitCorpus:
    """Documents from a JSONL or JSONL.gz file (or a glob of them), text under `text_field`."""
    paths = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise DataError(f"JSONL input {path!r} does not exist. Fix `jsonl.path`.")
    return UnitCorpus([Unit(p, "jsonl", text_field=text_field, id_field=id_field)
                       for p in paths])


@gin.configurable
def curated(path: str) -> UnitCorpus:
    """The documents `tools/curate` kept, read directly: ids, sources and metadata (domain,
    language, ...) intact.

    path: a curation output directory (its `kept/` is read), a `kept/` directory, or a glob of
      kept shards. `kept/*.array_record` is read when present, else `kept/*.jsonl.gz` (both hold
      the same records). Units are taken in sorted file order, which is curation's corpus order.
    """
    if os.path.isdir(os.path.join(path, "kept")):
        path = os.path.join(path, "kept")
    if os.path.isdir(path):
        paths = sorted(glob.glob(os.path.join(path, "*.array_record"))) or \
            sorted(glob.glob(os.path.join(path, "*.jsonl.gz")))
    else:
        paths = sorted(glob.glob(path))
    if not paths:
        raise DataError(f"No curated shards at {path!r} (expected kept/*.array_record or "
                        "kept/*.jsonl.gz written by `python -m tools.curate`). Fix "
                        "`curated.path`.")
    return UnitCorpus([Unit(p, "curated") for p in paths])


def jsonl_document(line: str, path: str, lineno: int, text_field: str = "text",
                   id_field: str | None = None) -> Document:
    """Parse one JSONL line into a Document; the parsing core shared with the curation readers.

    Raises `DataError` whose `reason` attribute is `malformed_json`, `missing_text_field`,
    `missing_text` (the text is null) or `bad_record` (the text is not a string).
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        err = DataError(f"{path}:{lineno} is not valid JSON ({e.msg}). Fix the line or "
                        "clean the file with `tools/curate`.")
        err.reason = "malformed_json"
        raise err from None
    if not isinstance(record, dict) or text_field not in record:
        err = DataError(f"{path}:{lineno} has no field {text_field!r}. Set "
                        "`jsonl.text_field` to the field holding the text.")
        err.reason = "missing_text_field"
        raise err
    text = record[text_field]
    if not isinstance(text, str):
        err = DataError(f"{path}:{lineno} has {text_field!r}: {json.dumps(text)[:40]}, not a "
                        "string. Drop the record, or curate the file with `tools/curate`.")
        err.reason = "missing_text" if text is None else "bad_record"
        raise err
    doc_id = str(record[id_field]) if id_field and id_field in record else f"{path}:{lineno}"
    meta = {k: v for k, v in record.items() if k not in (text_field, id_field)}
    return Document(id=doc_id, text=text, source=f"jsonl:{path}", metadata=meta)


SOURCES = {"embedded": embedded_corpus, "files": text_files, "jsonl": jsonl, "curated": curated}


@gin.configurable
def corpus(name: str = "embedded") -> Iterable[Document]:
    """The configured corpus. `name` is one of SOURCES; each source's own args are gin-bound.

    File-based sources (files, jsonl, curated) return a `UnitCorpus`, whose `units` `prepare`
    reads in parallel (and on Beam)."""
    if name not in SOURCES:
        raise DataError(f"Unknown corpus {name!r}; choose one of {sorted(SOURCES)} "
                        "(gin: `corpus.name`).")
    return SOURCES[name]()


def split_of(doc_id: str, validation_fraction: float) -> str:
    """'train' or 'validation', by a stable hash of the document id (same on every machine)."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return "validation" if h / 2**64 < validation_fraction else "train"


def split_documents(docs: Iterable[Document], validation_fraction: float
                    ) -> dict[str, list[Document]]:
    """Partition documents into {'train': [...], 'validation': [...]} with `split_of`."""
    out: dict[str, list[Document]] = {"train": [], "validation": []}
    for d in docs:
        out[split_of(d.id, validation_fraction)].append(d)
    return out
