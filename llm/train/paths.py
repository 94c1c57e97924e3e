"""Run-directory paths on local disk or in a bucket (`gs://bucket/runs/x`).

Everything a run writes into its directory (manifest.json, config.gin, metrics.jsonl,
eval.json, plots/, tb/, checkpoints/) goes through `etils.epath`, the path abstraction orbax
itself uses, so a run directory may be a `gs://` URI on a Cloud TPU VM (epath reaches GCS
through TensorFlow's file system, installed with tensorflow-datasets) and checkpoints go to
orbax as the same URI (array data through TensorStore's GCS driver).

Orbax lists the steps of a gs:// checkpoint directory through google-cloud-storage (it asks
whether the bucket has a hierarchical namespace), installed by the `[tpu]` extra;
`require_bucket_client` turns its absence into a one-line error before the run starts.

Object stores have no append: `append_text` on a remote path rewrites the object with the new
line added (metrics files are small: one line per logged step).
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath

from llm.config import ConfigError

_URI_SCHEMES = ("gs://", "s3://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is an object-store URI (gs://, s3://) rather than a local path."""
    return str(path).startswith(_URI_SCHEMES)


def run_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URI unchanged, a local path made absolute."""
    return epath.Path(path if is_remote(path) else os.path.abspath(path))


def require_bucket_client(path: str | os.PathLike, setting: str) -> None:
    """ConfigError unless the client libraries that orbax needs for `path` are importable
    (gs://: google-cloud-storage). `setting` names the gin binding for the message."""
    if not str(path).startswith("gs://"):
        return
    try:
        found = importlib.util.find_spec("google.cloud.storage") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(f"{setting}={str(path)!r}: checkpoints in a gs:// bucket need the "
                          "google-cloud-storage package; install it (pip install -e '.[tpu]' "
                          "or pip install google-cloud-storage), or use a local path.")


def append_text(path: epath.Path, text: str) -> None:
    """Append `text` to the file at `path` (created if missing)."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    path.write_text(old + text)
