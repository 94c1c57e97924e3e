"""Lenient readers: every input becomes a Document or a counted `Rejected`, never an exception.

The trainer's readers in `llm/data/sources.py` are strict (they raise `DataError`); curation must
instead account for every bad input. Both share one parsing core (`sources.jsonl_document`,
`sources.embedded_file_document`), so a JSONL line means the same thing to both.

A *source spec* is a dict (gin-bindable) with a `kind` and that kind's options:

    {"kind": "files", "path": "data/books/**/*.txt", "domain": "books"}
    {"kind": "jsonl", "path": "data/web/*.jsonl.gz", "text_field": "text", "domain": "web"}
    {"kind": "parquet", "path": "data/code/*.parquet", "text_field": "content", "domain": "code"}
    {"kind": "tfds", "dataset": "wikipedia/20230601.en", "split": "train", "data_dir": "..."}
    {"kind": "embedded"}                       # the Python stdlib + pydoc topics

Common options: `name` (the source name in reports; default derived from kind and path) and
`domain` (web, books, code, ...). Sources expand into *units* (a file, a group of small files,
a slice of a TFDS split); units are the grain of parallelism and of resumption.

Rejection reasons: `empty_file`, `binary_file`, `invalid_utf8`, `too_large`,
`corrupt_compressed` (truncated gzip/zstd), `malformed_json`, `missing_text_field`,
`missing_text` (a JSONL/Parquet record whose text is null), `unreadable_file`, `bad_record`
(a record whose text is not a string).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import os
import pathlib
import zlib
from collections.abc import Iterator

import gin

from llm.data import sources
from llm.data.curate.records import CurationError, Rejected, sample_of
from llm.data.sources import DataError, Document

KINDS = ("files", "jsonl", "parquet", "tfds", "embedded")
_OPTIONS = {"files": set(), "jsonl": {"text_field", "id_field"},
            "parquet": {"text_field", "id_field"}, "tfds": {"data_dir", "text_field"},
            "embedded": set()}


def _check_options(kind: str, spec: dict) -> None:
    extra = set(spec) - _OPTIONS[kind]
    if extra:
        raise CurationError(f"Unknown option(s) {sorted(extra)} for a {kind} source; allowed: "
                            f"{sorted(_OPTIONS[kind] | {'kind', 'name', 'domain', 'path'})}.")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source."""

    kind: str
    source: str
    domain: str
    paths: tuple[str, ...] = ()
    options: tuple[tuple[str, object], ...] = ()

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """How lenient reading treats bad bytes.

    max_doc_bytes: documents larger than this are removed as `too_large` (without reading them
      whole when the size is known up front).
    max_invalid_utf8_fraction: documents with at most this fraction of undecodable bytes are
      repaired (U+FFFD); above it they are removed as `invalid_utf8`.
    binary_control_fraction: a file whose first 8 KiB hold a NUL byte or more than this fraction
      of non-text control bytes is removed as `binary_file`.
    files_per_unit: small text files are grouped this many to a unit.
    """

    max_doc_bytes: int = 10_000_000
    max_invalid_utf8_fraction: float = 0.01
    binary_control_fraction: float = 0.1
    files_per_unit: int = 256


def _glob(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def plan_units(specs: list[dict], limits: ReadLimits | None = None) -> list[Unit]:
    """Expand source specs into a deterministic list of units. Raises for unusable specs."""
    limits = limits or ReadLimits()
    units: list[Unit] = []
    if not specs:
        raise CurationError("No sources configured. Set `curate.sources` to a list of source "
                            "specs, e.g. [{'kind': 'embedded'}].")
    for spec in specs:
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind not in KINDS:
            raise CurationError(f"Source spec {spec} has kind {kind!r}; use one of {KINDS}.")
        domain = spec.pop("domain", "code" if kind == "embedded" else "web")
        if kind == "embedded":
            root = sources.stdlib_root()
            files = [str(p.relative_to(root)) for p in
                     sources.embedded_files(spec.pop("include_tests", False))]
            name = spec.pop("name", "stdlib")
            step = 64
            for i in range(0, len(files), step):
                units.append(Unit("embedded", name, domain, tuple(files[i:i + step])))
            if spec.pop("include_docs", True):
                units.append(Unit("pydoc", "pydoc", "docs"))
            _check_options(kind, spec)
            continue
        if kind == "tfds":
            ds = spec.pop("dataset", None)
            if not ds:
                raise CurationError("A tfds source needs `dataset` (e.g. 'imdb_reviews').")
            split = spec.pop("split", "train")
            n = int(spec.pop("num_units", 1))
            src = spec.pop("name", f"tfds:{ds}")
            _check_options(kind, spec)
            for i in range(n):
                sub = split if n == 1 else f"{split}[{100 * i // n}%:{100 * (i + 1) // n}%]"
                units.append(Unit("tfds", src, domain, (ds,),
                                  tuple(sorted({**spec, "split": sub}.items()))))
            continue
        path = spec.pop("path", None)
        if not path:
            raise CurationError(f"A {kind} source needs `path` (a file, directory or glob).")
        paths = _glob(path)
        if not paths:
            raise CurationError(f"No files match {path!r} for the {kind} source. Check the path "
                                "or the glob.")
        name = spec.pop("name", f"{kind}:{path}")
        _check_options(kind, spec)
        options = tuple(sorted(spec.items()))
        if kind == "files":
            for i in range(0, len(paths), limits.files_per_unit):
                units.append(Unit(kind, name, domain, tuple(paths[i:i + limits.files_per_unit]),
                                  options))
        else:
            units.extend(Unit(kind, name, domain, (p,), options) for p in paths)
    return units


def decode(data: bytes, limits: ReadLimits) -> tuple[str | None, str | None, int]:
    """UTF-8 decode with repair: (text, rejection_reason, number_of_repaired_bytes)."""
    try:
        return data.decode("utf-8"), None, 0
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.count("\xef\xbf\xbd".encode("latin-1"))
    if bad > limits.max_invalid_utf8_fraction * max(len(data), 1):
        return None, "invalid_utf8", bad
    return text, None, bad


def looks_binary(head: bytes, limits: ReadLimits) -> bool:
    """NUL bytes or many non-text control bytes in the first bytes of a file."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    ctrl = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
    return ctrl > limits.binary_control_fraction * len(head)


def _reject(doc_id: str, source: str, reason: str, sample: str | bytes = "",
            **meta) -> Rejected:
    if isinstance(sample, bytes):
        sample = sample[:200].decode("utf-8", errors="backslashreplace")
    return Rejected(doc_id, source, reason, sample_of(sample), meta)


def _with_meta(doc: Document, unit: Unit, **extra) -> Document:
    meta = {"domain": unit.domain, **doc.metadata, **extra}
    return dataclasses.replace(doc, source=unit.source, metadata=meta)


def _read_files(unit: Unit, limits: ReadLimits) -> Iterator[Document | Rejected]:
    for path in unit.paths:
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                if size > limits.max_doc_bytes:
                    yield _reject(path, unit.source, "too_large", f.read(200), bytes=size)
                    continue
                data = f.read()
        except OSError as e:
            yield _reject(path, unit.source, "unreadable_file", str(e))
            continue
        if not data.strip():
            yield _reject(path, unit.source, "empty_file")
            continue
        if looks_binary(data[:8192], limits):
            yield _reject(path, unit.source, "binary_file", data)
            continue
        text, reason, repaired = decode(data, limits)
        if reason:
            yield _reject(path, unit.source, reason, data)
            continue
        meta = {"path": path, **({"utf8_repaired_bytes": repaired} if repaired else {})}
        yield Document(id=path, text=text, source=unit.source,
                       metadata={"domain": unit.domain, **meta})


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst") or path.endswith(".zstd"):
        import zstandard

        fh = open(path, "rb")  # noqa: SIM115 - closed by the TextIO wrapper's owner
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
    return open(path, "rb")  # noqa: SIM115


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


def _read_jsonl(unit: Unit, limits: ReadLimits) -> Iterator[Document | Rejected]:
    path = unit.paths[0]
    text_field = unit.option("text_field", "text")
    id_field = unit.option("id_field")
    lineno = 0
    any_line = False
    try:
        with _open_binary(path) as f:
            while True:
                raw = f.readline(limits.max_doc_bytes + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > limits.max_doc_bytes and not raw.endswith(b"\n"):
                    size = len(raw)
                    head = raw[:200]
                    while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                        raw = f.readline(1 << 24)
                        size += len(raw)
                    yield _reject(f"{path}:{lineno}", unit.source, "too_large", head,
                                  bytes=size)
                    any_line = True
                    continue
                if not raw.strip():
                    continue
                any_line = True
                line, reason, repaired = decode(raw, limits)
                if reason:
                    yield _reject(f"{path}:{lineno}", unit.source, reason, raw)
                    continue
                try:
                    doc = sources.jsonl_document(line, path, lineno, text_field, id_field)
                except DataError as e:
                    yield _reject(f"{path}:{lineno}", unit.source,
                                  getattr(e, "reason", "malformed_json"), line)
                    continue
                extra = {"path": path}
                if repaired:
                    extra["utf8_repaired_bytes"] = repaired
                yield _with_meta(doc, unit, **extra)
    except _corrupt_errors() as e:
        yield _reject(f"{path}:after-line-{lineno}", unit.source, "corrupt_compressed",
                      f"{type(e).__name__}: {e}")
        return
    except OSError as e:
        yield _reject(path, unit.source, "unreadable_file", str(e))
        return
    if not any_line:
        yield _reject(path, unit.source, "empty_file")


def _read_parquet(unit: Unit, limits: ReadLimits) -> Iterator[Document | Rejected]:
    import pyarrow.parquet as pq

    path = unit.paths[0]
    text_field = unit.option("text_field", "text")
    id_field = unit.option("id_field")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for bad files
        yield _reject(path, unit.source, "unreadable_file", f"{type(e).__name__}: {e}")
        return
    if text_field not in pf.schema_arrow.names:
        raise CurationError(f"{path} has no column {text_field!r} (columns: "
                            f"{pf.schema_arrow.names}). Set the source's `text_field`.")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            doc_id = str(rec[id_field]) if id_field and id_field in rec else f"{path}:{row}"
            text = rec.pop(text_field)
            if not isinstance(text, str):
                yield _reject(doc_id, unit.source, "missing_text" if text is None else "bad_record",
                              repr(text)[:200])
                continue
            if len(text) > limits.max_doc_bytes:
                yield _reject(doc_id, unit.source, "too_large", text[:200], bytes=len(text))
                continue
            meta = {"domain": unit.domain, "path": path,
                    **{k: v for k, v in rec.items() if k != id_field and _jsonable(v)}}
            yield Document(id=doc_id, text=text, source=unit.source, metadata=meta)
    if row == 0:
        yield _reject(path, unit.source, "empty_file")


def _jsonable(v) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _read_tfds(unit: Unit, limits: ReadLimits) -> Iterator[Document | Rejected]:
    import tensorflow_datasets as tfds  # lazy: TF is only imported for TFDS sources

    name = unit.paths[0]
    split = unit.option("split", "train")
    text_field = unit.option("text_field", "text")
    ds = tfds.load(name, split=split, data_dir=unit.option("data_dir"), download=False)
    for i, ex in enumerate(tfds.as_numpy(ds)):
        doc_id = f"{name}/{split}/{i}"
        raw = ex.get(text_field)
        if not isinstance(raw, bytes | str):
            yield _reject(doc_id, unit.source, "bad_record", repr(raw)[:200])
            continue
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        if len(raw) > limits.max_doc_bytes:
            yield _reject(doc_id, unit.source, "too_large", raw, bytes=len(raw))
            continue
        text, reason, _ = decode(raw, limits)
        if reason:
            yield _reject(doc_id, unit.source, reason, raw)
            continue
        meta = {"domain": unit.domain}
        for k, v in ex.items():
            if k != text_field:
                v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                if _jsonable(v):
                    meta[k] = v
                elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
                    meta[k] = v.item()
        yield Document(id=doc_id, text=text, source=unit.source, metadata=meta)


def _read_embedded(unit: Unit, limits: ReadLimits) -> Iterator[Document | Rejected]:
    root = sources.stdlib_root()
    for rel in unit.paths:
        path = root / rel
        doc = sources.embedded_file_document(pathlib.Path(path), root)
        if doc is None:
            data = path.read_bytes() if path.exists() else b""
            reason = "empty_file" if not data.strip() else "invalid_utf8"
            yield _reject(f"stdlib/{rel}", unit.source, reason, data)
        else:
            yield _with_meta(doc, unit)


def _read_pydoc(unit: Unit, limits: ReadLimits) -> Iterator[Document | Rejected]:
    for doc in sources.pydoc_documents():
        yield dataclasses.replace(doc, metadata={**doc.metadata, "domain": unit.domain})


_READERS = {"files": _read_files, "jsonl": _read_jsonl, "parquet": _read_parquet,
            "tfds": _read_tfds, "embedded": _read_embedded, "pydoc": _read_pydoc}


def read_unit(unit: Unit, limits: ReadLimits | None = None) -> Iterator[Document | Rejected]:
    """Every record of one unit, in a fixed order, as Documents or Rejected (never raises for
    bad data; raises `CurationError` only for a misconfigured source)."""
    yield from _READERS[unit.kind](unit, limits or ReadLimits())
