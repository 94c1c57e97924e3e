"""Work and state files under a curation output directory: msgpack with a versioned header.

Output directories are shared (a bucket, a team disk), so nothing read back from them may execute
code: these files are never pickles. A file starts with `MAGIC` and a one-byte `VERSION`; a file
without them, or of another version, is refused with a message saying how to recover (rerun with
`--restart`). Values are msgpack types plus four extension types: numpy arrays (dtype string,
shape and raw bytes; object dtypes are refused), tuples, sets and `Document`s. Other scalars in
document metadata (numpy scalars, dates) are stored as their Python value or their `str()`.

A stage file is a header followed by a stream of msgpack objects (one per chunk of documents).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import msgpack
import numpy as np

from llm.data.curate.records import CurationError
from llm.data.sources import Document

MAGIC = b"LLMCURATE"
VERSION = 2  # 1 was the pickled format of the first release, never loaded
_ARRAY, _TUPLE, _SET, _DOC = 1, 2, 3, 4
_MAX_BUFFER = (1 << 31) - 1


def _default(obj):
    if isinstance(obj, tuple):
        return msgpack.ExtType(_TUPLE, _pack(list(obj)))
    if isinstance(obj, Document):
        return msgpack.ExtType(_DOC, _pack([obj.id, obj.text, obj.source, obj.metadata]))
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays are not stored in work files")
        a = np.ascontiguousarray(obj)
        return msgpack.ExtType(_ARRAY, _pack([a.dtype.str, list(a.shape), a.tobytes()]))
    if isinstance(obj, set | frozenset):
        return msgpack.ExtType(_SET, _pack(sorted(obj, key=repr)))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict | list):   # subclasses (strict_types sends them here)
        return type(obj).__mro__[-2](obj)
    return str(obj)


def _ext(code: int, data: bytes):
    v = _unpack(data)
    if code == _TUPLE:
        return tuple(v)
    if code == _DOC:
        return Document(id=v[0], text=v[1], source=v[2], metadata=v[3])
    if code == _ARRAY:
        dtype = np.dtype(v[0])
        if dtype.hasobject:
            raise CurationError("A work file holds an object array; refusing to load it.")
        return np.frombuffer(v[2], dtype).reshape(v[1]).copy()
    if code == _SET:
        return set(v)
    raise CurationError(f"A work file holds an unknown extension type {code}.")


def _pack(obj) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, ext_hook=_ext, raw=False, strict_map_key=False)


def _header() -> bytes:
    return MAGIC + bytes([VERSION])


def _check(head: bytes, path: str) -> None:
    if head[:len(MAGIC)] != MAGIC:
        raise CurationError(f"{path} is not a curation work file (no {MAGIC.decode()} header; "
                            "pickled work files of older versions are never loaded). Rerun with "
                            "--restart to discard the work directory.")
    if head[len(MAGIC):] != bytes([VERSION]):
        found = head[len(MAGIC)] if len(head) > len(MAGIC) else "?"
        raise CurationError(f"{path} is a work file of format version {found}; this version "
                            f"reads version {VERSION}. Rerun with --restart to discard the work "
                            "directory.")


def dumps(obj) -> bytes:
    """Header + one msgpack object."""
    return _header() + _pack(obj)


def loads(data: bytes, path: str = "work file"):
    """Inverse of `dumps`; refuses other formats and versions."""
    _check(data[:len(MAGIC) + 1], path)
    return _unpack(data[len(MAGIC) + 1:])


def load(path: str):
    with open(path, "rb") as f:
        return loads(f.read(), path)


def write_stream(f: BinaryIO, objs) -> None:
    """Header, then each object of `objs` (a stage file)."""
    f.write(_header())
    packer = msgpack.Packer(default=_default, use_bin_type=True, strict_types=True)
    for obj in objs:
        f.write(packer.pack(obj))


def read_stream(path: str) -> Iterator:
    """The objects of a file written by `write_stream`, one at a time."""
    with open(path, "rb") as f:
        _check(f.read(len(MAGIC) + 1), path)
        yield from msgpack.Unpacker(f, ext_hook=_ext, raw=False, strict_map_key=False,
                                    max_buffer_size=_MAX_BUFFER)
