"""Run records: metrics.jsonl, TensorBoard, the console, the loss-curve PNG, and MFU.

The run directory may be local or a gs:// URI: files are written through etils.epath
(`llm.train.paths`), TensorBoard event files too (an epath writer registered with tensorboardX
for gs://, replacing its google-cloud-storage one).

MFU = model FLOPs per second / peak FLOPs per second of the devices used. The peak is, in order:
`peak_flops.per_device` from gin, a table of published bf16 dense peaks per device kind, or on
CPU a large fp32 matmul measured in this process (`measure_matmul_flops`).
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from llm.train.paths import append_text, run_path

# Published dense bf16 peak FLOP/s per chip, matched against `device.device_kind` (lower-case).
PEAK_FLOPS_BY_KIND = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
}


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul on every local device at once (median of `repeats`)."""
    devices = jax.local_devices()
    a = [jax.device_put(jnp.ones((n, n), dtype), d) for d in devices]
    f = jax.jit(lambda x: x @ x)
    for x in a:
        f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [f(x) for x in a]
        for o in outs:
            o.block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))  # per device (they ran concurrently)


@gin.configurable
def peak_flops(per_device: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if per_device:
        return per_device, "gin"
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS_BY_KIND.items():
        if name in kind:
            return flops, f"table:{name}"
    return measure_matmul_flops(), "measured fp32 matmul"


class _EpathEventWriter:
    """A tensorboardX record writer for an object-store URI: buffers the event file and
    rewrites the object through epath on every flush (objects have no append)."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventWriterFactory:
    def open(self, path: str) -> _EpathEventWriter:
        return _EpathEventWriter(path)

    def directory_check(self, path: str) -> None:
        del path  # object stores need no directories


def _tensorboardx():
    """tensorboardX, imported on first use, with the gs:// event writer registered.

    Its `writer` module imports PyTorch when torch is installed (only to accept torch tensors in
    add_*, which we never pass): about 180 MB of resident memory and 2 s in every training
    process. So the import runs with torch hidden, unless torch is already loaded; tensorboardX
    then falls back to numpy arrays, which is all `MetricsWriter` gives it.
    """
    if "tensorboardX" not in sys.modules:
        hide = "torch" not in sys.modules
        if hide:
            sys.modules["torch"] = None  # `import torch` raises ImportError
        try:
            import tensorboardX
        finally:
            if hide:
                del sys.modules["torch"]
        tensorboardX.record_writer.register_writer_factory("gs", _EpathEventWriterFactory())
    return sys.modules["tensorboardX"]


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl (appending across resumes) and
    the same scalars to TensorBoard. Only process 0 writes. run_dir: local or gs://."""

    def __init__(self, run_dir: str):
        self.active = jax.process_index() == 0
        self.directory = run_path(run_dir)
        self.path = self.directory / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._tb = _tensorboardx().SummaryWriter(str(self.directory / "tb"))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        name = "metrics.jsonl" if prefix == "train" else f"{prefix}_metrics.jsonl"
        append_text(self.directory / name, json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """metrics.jsonl (local or gs://) as a list, keeping the last record per step (a resumed
    run rewrites the steps after its checkpoint)."""
    path = run_path(path)
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(run_dir: str) -> str:
    """plots/loss.png: training loss (and validation loss if recorded) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = run_path(run_dir)
    train = read_metrics(directory / "metrics.jsonl")
    evals = read_metrics(directory / "eval_metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(directory.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = directory / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    out.write_bytes(png.getvalue())
    return str(out)
