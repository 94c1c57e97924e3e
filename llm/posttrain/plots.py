"""PNG curves of an RL run from its metrics.jsonl (matplotlib, Agg)."""

from __future__ import annotations

import math
import os

from llm.train.metrics import read_metrics

# The panels of plots/rlhf.png, in order, when the run logged them.
MAIN_CURVES = ("reward", "kl", "entropy", "response_length")


def plot_rl_metrics(run_dir: str) -> list[str]:
    """plots/rlhf.png (reward, KL to the reference, entropy, response length against step) and
    one plots/<metric>.png per other numeric metric. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not records:
        return []
    keys = [k for k in records[-1] if k != "step" and isinstance(records[-1][k], (int, float))]
    steps = [r["step"] for r in records]
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    main = [k for k in MAIN_CURVES if k in keys]
    if main:
        cols = 2
        rows = math.ceil(len(main) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(10, 3.2 * rows), dpi=110, squeeze=False)
        for ax, key in zip(axes.flat, main):
            ax.plot(steps, [r.get(key, float("nan")) for r in records], lw=1.2)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(main):]:
            ax.axis("off")
        fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
        fig.tight_layout()
        path = os.path.join(out_dir, "rlhf.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    for key in keys:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, [r.get(key, float("nan")) for r in records], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{key.replace('/', '_')}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
