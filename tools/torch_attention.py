"""PyTorch's CPU attention alone, forward and forward + backward, for
`tools/bench_blocked_attention.py` (which times ours against it, interleaved).

It computes what one layer of `tools/torch_twin.py` computes: q, k, v [batch, seq, heads,
head_dim] (the layout its fused QKV projection yields), transposed to [batch, heads, seq,
head_dim] views, `F.scaled_dot_product_attention(is_causal=True)` (PyTorch's fused flash-style
CPU kernel), the output transposed back. "fwd+bwd" is the gradient of sum(out * w) with respect
to q, k and v -- the same function ours is timed on.

Variants: "sdpa_eager", and "sdpa_compiled" (the same function under `torch.compile`: forward
and, through AOTAutograd, backward; its compile is the first call, reported and never timed).

Runs under its own interpreter (PyTorch is not a dependency of `llm`), one JSON object a line:

  -> {"cmd": "setup", "batch": 2, "seq": 2048, "heads": 4, "head_dim": 64}
  <- {"threads": T, "first_s": {variant: s}, "torch": version}
  -> {"cmd": "run"}           one call of each variant, fwd then fwd+bwd
  <- {"sdpa_eager": {"fwd": s, "grad": s}, "sdpa_compiled": {...}}
  -> {"cmd": "quit"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q/k/v [batch, seq, heads, head_dim] -> [batch, seq, heads, head_dim], causal."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True)
    return out.transpose(1, 2)


def objective(q, k, v, w):
    return (attention(q, k, v) * w).sum()


class Point:
    """One shape: inputs and the eager / compiled functions, each called once at setup."""

    def __init__(self, batch: int, seq: int, heads: int, head_dim: int):
        g = torch.Generator().manual_seed(0)
        shape = (batch, seq, heads, head_dim)
        self.q, self.k, self.v, self.w = (torch.randn(shape, generator=g) for _ in range(4))
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)
        torch._dynamo.reset()
        self.fns = {"sdpa_eager": (attention, objective),
                    "sdpa_compiled": (torch.compile(attention), torch.compile(objective))}
        self.first_s = {}
        for name in self.fns:
            t = time.perf_counter()
            self.call(name)
            self.first_s[name] = time.perf_counter() - t

    def call(self, name: str) -> dict[str, float]:
        fwd, obj = self.fns[name]
        times = {}
        t = time.perf_counter()
        with torch.no_grad():
            fwd(self.q, self.k, self.v)
        times["fwd"] = time.perf_counter() - t
        t = time.perf_counter()
        torch.autograd.grad(obj(self.q, self.k, self.v, self.w), (self.q, self.k, self.v))
        times["grad"] = time.perf_counter() - t
        return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    point = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        if msg["cmd"] == "setup":
            point = Point(msg["batch"], msg["seq"], msg["heads"], msg["head_dim"])
            reply = {"threads": torch.get_num_threads(), "first_s": point.first_s,
                     "torch": torch.__version__}
        else:
            reply = {name: point.call(name) for name in point.fns}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
