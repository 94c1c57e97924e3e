"""manifest.json: what is needed to reproduce a run, written beside its checkpoints."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import gin
import jax

from llm.train.paths import run_path

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "gin-config",
            "sentencepiece", "array-record", "numpy", "seqio", "tensorflow",
            "tensorflow-datasets")

# Environment variables that change numerics or the device set (recorded so a replay sets them).
ENV_VARS = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION")


def git_commit(path: str = ".") -> dict:
    """{'commit': sha or None, 'dirty': bool} for the repository containing `path`."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                              timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_manifest(run_dir: str, *, mesh_shape: dict, seed: int, data: dict,
                   extra: dict | None = None) -> str:
    """Write run_dir/manifest.json and run_dir/config.gin (the operative gin config).

    data: the dataset record (fingerprint, counts) from prepare_data's dataset.json.
    run_dir: a local path or a gs:// URI (`llm.train.paths`). Returns manifest.json's path.
    """
    directory = run_path(run_dir)
    if jax.process_index() != 0:
        return str(directory / "manifest.json")
    directory.mkdir(parents=True, exist_ok=True)
    operative = gin.operative_config_str()
    (directory / "config.gin").write_text(operative)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "gin_config": operative,
        "git": git_commit(repo),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "devices": {"backend": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                    "count": jax.device_count(), "processes": jax.process_count()},
        "env": {var: os.environ.get(var) for var in ENV_VARS},
        "mesh": mesh_shape,
        "seed": seed,
        "data": data,
        **(extra or {}),
    }
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return str(path)
