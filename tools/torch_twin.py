"""A hand-written PyTorch twin of the GPT-2-style decoder, for throughput comparison only.

It computes the same training step as `llm.train.step.train_step` on `gin_configs/models/
gpt2_tiny.gin` (pre-norm blocks, LayerNorm, learned positions, tanh-GELU, biases, tied
embeddings; the same parameter count and FLOPs), on the same kind of batch (`inputs`, `targets`,
`loss_mask`, `segment_ids`, `positions`):

  loss = sum(mask * -log p(target)) / sum(mask), attention causal within a segment,
  global-norm clipping to 1.0, AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices
  only), a warmup + cosine learning rate, and the step's metrics (loss, accuracy, grad norm).

The layout is the one a PyTorch user writes by hand (nanoGPT): one fused [d, 3d] QKV projection
and `F.scaled_dot_product_attention`. It runs under its own interpreter (PyTorch is not a
dependency of `llm`) and talks to `tools/bench_train.py` over stdin/stdout, one JSON object a
line, so the two can be timed interleaved (A B A B ...) in one benchmark run:

  -> {"cmd": "run", "steps": 5}
  <- {"times": [s, ...], "cpu": [s, ...], "loss": float, "max_rss_mb": peak RSS so far}
  -> {"cmd": "quit"}

On start it runs one step (with --compile that step compiles: its time is the compile cost,
reported as "first_step_s" and never counted among the timed steps) and prints
{"ready": true, "params": N, "threads": T, "interop_threads": I, "first_step_s": s,
"compile": bool}. Standalone use:

  /tmp/torchvenv/bin/python tools/torch_twin.py --steps 20 [--compile]

--compile wraps the forward + loss in `torch.compile` (inductor; the backward is compiled by
AOTAutograd from the same graph), the strongest form of the twin on CPU; AdamW is torch's
foreach implementation (--fused for the fused one).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """x + attn(ln(x)); x + mlp(ln(x)). Attention is causal and stays inside a segment."""

    def __init__(self, d: int, heads: int, hidden: int, eps: float, no_attention: bool = False):
        super().__init__()
        self.heads = heads
        self.no_attention = no_attention
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.fc = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        if self.no_attention:  # bench_train --no_attention: the step minus attention
            x = x + self.proj(q + k + v)
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, hidden: int,
                 max_seq_len: int, eps: float, std: float = 0.02, no_attention: bool = False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden, eps, no_attention)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=eps)
        for name, p in self.named_parameters():
            if p.ndim >= 2:  # same init as llm.model.layers: truncated normal, scaled out-projs
                scale = 1 / math.sqrt(2 * layers) if name.endswith(("proj.weight",
                                                                    "out.weight")) else 1
                nn.init.trunc_normal_(p, std=std * scale, a=-2 * std * scale, b=2 * std * scale)
            elif "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, inputs, positions, mask):
        x = self.wte(inputs) + self.wpe(positions)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x) @ self.wte.weight.t()  # tied output layer, fp32 logits


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i may attend key j: j <= i and the same segment."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same)[:, None]


class Trainer:
    """The model, its optimizer and one synthetic batch; `step()` is one full update."""

    def __init__(self, args: argparse.Namespace):
        torch.manual_seed(0)
        self.model = GPT(args.vocab, args.d_model, args.layers, args.heads, args.hidden,
                         args.max_seq_len, args.eps, no_attention=args.no_attention)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=args.fused or None)
        total, warm = args.total_steps, min(args.warmup_steps, args.total_steps - 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: (
            t / max(warm, 1) if t < warm else
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(total - warm,
                                                                                  1))))))
        g = torch.Generator().manual_seed(0)
        b, s = args.batch, args.seq
        self.inputs = torch.randint(0, args.vocab, (b, s), generator=g)
        self.targets = torch.randint(0, args.vocab, (b, s), generator=g)
        self.loss_mask = torch.ones(b, s)
        segment_ids = torch.ones(b, s, dtype=torch.long)
        self.positions = torch.arange(s).expand(b, s).contiguous()
        # One segment per row: the segment mask equals the causal mask, and SDPA's is_causal
        # path is what a hand-written model uses. --segment_mask builds the explicit mask.
        self.mask = attention_mask(segment_ids) if args.segment_mask else None
        self.loss_fn = torch.compile(self._loss) if args.compile else self._loss

    def _loss(self, inputs, positions, mask, targets, loss_mask):
        """(loss, flat logits): masked mean next-token cross entropy."""
        logits = self.model(inputs, positions, mask)
        flat = logits.view(-1, logits.shape[-1])
        nll = F.cross_entropy(flat, targets.view(-1), reduction="none")
        loss_mask = loss_mask.view(-1)
        return (nll * loss_mask).sum() / loss_mask.sum().clamp(min=1.0), flat

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        loss, flat = self.loss_fn(self.inputs, self.positions, self.mask, self.targets,
                                  self.loss_mask)
        mask = self.loss_mask.view(-1)
        tokens = mask.sum().clamp(min=1.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():  # the same metrics as train_step
            accuracy = ((flat.argmax(-1) == self.targets.view(-1)) * mask).sum() / tokens
        del grad_norm, accuracy
        return float(loss.detach())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--max_seq_len", type=int, default=1024)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--total_steps", type=int, default=1000)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward + loss (first step = compile, untimed)")
    p.add_argument("--segment_mask", action="store_true",
                   help="explicit causal+segment boolean mask instead of is_causal")
    p.add_argument("--no_attention", action="store_true",
                   help="attention replaced by q + k + v (as bench_train --no_attention)")
    p.add_argument("--serve", action="store_true", help="JSON-lines protocol on stdin/stdout")
    p.add_argument("--steps", type=int, default=20, help="standalone: timed steps")
    p.add_argument("--warmup", type=int, default=3, help="standalone: untimed steps")
    return p.parse_args(argv)


def timed(trainer: Trainer, steps: int) -> tuple[list[float], list[float], float]:
    """(wall seconds, process CPU seconds, last loss) of `steps` steps, one entry per step."""
    times, cpu, loss = [], [], float("nan")
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        loss = trainer.step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return times, cpu, loss


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    first = time.perf_counter()
    trainer.step()  # compiles under --compile; never among the timed steps
    first = time.perf_counter() - first
    if not args.serve:
        timed(trainer, args.warmup)
        times, _, loss = timed(trainer, args.steps)
        times.sort()
        ms = times[len(times) // 2] * 1e3
        print(f"params {trainer.num_params():,}  threads {torch.get_num_threads()}  "
              f"first step {first:.1f} s  median step {ms:.1f} ms  "
              f"{args.batch * args.seq / ms * 1e3:,.0f} tokens/s  loss {loss:.3f}")
        return
    out = sys.stdout
    out.write(json.dumps({"ready": True, "params": trainer.num_params(),
                          "threads": torch.get_num_threads(),
                          "interop_threads": torch.get_num_interop_threads(),
                          "first_step_s": first, "compile": args.compile,
                          "torch": torch.__version__}) + "\n")
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        times, cpu, loss = timed(trainer, int(msg["steps"]))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.write(json.dumps({"times": times, "cpu": cpu, "loss": loss, "max_rss_mb": rss})
                  + "\n")
        out.flush()


if __name__ == "__main__":
    main()
