"""A fake gs:// for tests: every `gs://<bucket>/<key>` is the local file `<root>/<bucket>/<key>`.

`install(root)` redirects the two ways a run reaches GCS: etils.epath's gs:// backend (our
run-directory files, and orbax's directories, metadata and renames) and the TensorStore
kvstore that orbax opens for a gs:// checkpoint (array data; TensorStore's `gcs` driver becomes
its `file` driver on the mapped path). Nothing else is patched, so any code that bypasses the
path abstraction (os.path, open() on the URI) writes a local `gs:` directory instead, which the
tests look for.

python -m tests.train.fake_gcs <root> <experiment module> <args...> runs an experiment's
`main` with the fake installed.
"""

from __future__ import annotations

import importlib
import os
import sys

from etils.epath import backend, gpath


def _local(root: str, path) -> str:
    path = os.fspath(path)
    return os.path.join(root, path[len("gs://"):]) if path.startswith("gs://") else path


def _uri(root: str, path: str) -> str:
    prefix = root.rstrip("/") + "/"
    return "gs://" + path[len(prefix):] if path.startswith(prefix) else path


class MappedBackend(backend._OsPathBackend):  # noqa: SLF001 -- epath's own local backend
    """epath's local-disk backend, on paths mapped from gs:// to `root`."""

    def __init__(self, root: str):
        self.root = root

    def open(self, path, mode):
        if "w" in mode or "a" in mode:  # object stores have no directories to create first
            os.makedirs(os.path.dirname(_local(self.root, path)), exist_ok=True)
        return super().open(_local(self.root, path), mode)

    def exists(self, path):
        return super().exists(_local(self.root, path))

    def isdir(self, path):
        return super().isdir(_local(self.root, path))

    def listdir(self, path):
        return super().listdir(_local(self.root, path))

    def glob(self, path):
        return [_uri(self.root, p) for p in super().glob(_local(self.root, path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(_local(self.root, top), top_down=top_down,
                                              on_error=on_error):
            yield _uri(self.root, root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(_local(self.root, path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(_local(self.root, path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(_local(self.root, path))

    def remove(self, path):
        return super().remove(_local(self.root, path))

    def rename(self, path, dst):
        return super().rename(_local(self.root, path), _local(self.root, dst))

    def replace(self, path, dst):
        return super().replace(_local(self.root, path), _local(self.root, dst))

    def copy(self, path, dst, overwrite):
        return super().copy(_local(self.root, path), _local(self.root, dst), overwrite)

    def stat(self, path):
        return super().stat(_local(self.root, path))


def install(root: str) -> None:
    """Map gs:// to `root` for epath and for orbax's TensorStore specs, in this process."""
    from orbax.checkpoint._src.path import gcs_utils

    from llm.train import paths

    paths.require_bucket_client = lambda path, setting: None  # the fake stands in for it
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # a plain bucket
    gpath._is_tf_installed = lambda: False  # noqa: SLF001 -- else epath picks tf.io.gfile
    gpath._PREFIX_TO_BACKEND["gs"] = MappedBackend(root)  # noqa: SLF001
    gcs_utils.get_kvstore_for_gcs = lambda path: {"driver": "file",
                                                  "path": _local(root, path)}


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
