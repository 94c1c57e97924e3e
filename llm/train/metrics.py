"""Run records: metrics.jsonl, TensorBoard, the console, the loss-curve PNG, and MFU.

MFU = model FLOPs per second / peak FLOPs per second of the devices used. The peak is, in order:
`peak_flops.per_device` from gin, a table of published bf16 dense peaks per device kind, or on
CPU a large fp32 matmul measured in this process (`measure_matmul_flops`).
"""

from __future__ import annotations

import json
import math
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

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


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl (appending across resumes) and
    the same scalars to TensorBoard. Only process 0 writes."""

    def __init__(self, run_dir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(run_dir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path if prefix == "train" else self.path.replace(
                "metrics.jsonl", f"{prefix}_metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl as a list, keeping the last record per step (a resumed run rewrites the
    steps after its checkpoint)."""
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(run_dir: str) -> str:
    """plots/loss.png: training loss (and validation loss if recorded) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_metrics(os.path.join(run_dir, "eval_metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(run_dir, "plots", "loss.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
