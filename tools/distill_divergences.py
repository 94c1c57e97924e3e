"""What each distillation loss made of its student: per-token divergences to the teacher on the
validation split.

    python -m tools.distill_divergences --teacher=runs/compress/larger \
        --students=runs/distill4/fkl_seed0,runs/distill4/rkl_seed0,... [--batches=20] \
        [--batch_size=8] [--out=divergences.json]

For every student (its final checkpoint) and the teacher, over the first `--batches` batches of
the unshuffled validation split (the teacher's data directory), per scored token, in nats, at
temperature 1 (the distributions that are evaluated):

  ce          cross entropy to the data token (what bits/byte measures)
  fkl         KL(p || q), p the teacher, q the student (forward: mass-covering)
  rkl         KL(q || p) (reverse: mode-seeking)
  jsd         the symmetric Jensen-Shannon divergence (beta 0.5)
  H(q), H(p)  the student's and the teacher's entropy
  agree       the share of tokens where the student's and the teacher's argmax agree
  q(top-p)    the student's probability on the teacher's argmax

Why bits/byte follows forward KL: CE(data, q) = CE(data, p) + E_data[log p/q], and if the data
were drawn from the teacher, E_p[log p/q] is exactly KL(p || q). Prints a table; writes JSON
with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from llm.config import ConfigError
from llm.data.pipeline import make_dataset
from llm.data.sources import DataError
from llm.model import transformer
from llm.runs import load_run

STATS = ("ce", "fkl", "rkl", "jsd", "H(q)", "H(p)", "agree", "q(top-p)")


def token_stats(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over masked tokens. logits [batch, seq, vocab]; targets, mask [batch, seq]."""
    lq = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    lp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    q, p = jnp.exp(lq), jnp.exp(lp)
    lm = jnp.log(0.5 * p + 0.5 * q)
    m = mask.astype(jnp.float32)
    per = {
        "ce": -jnp.take_along_axis(lq, targets[..., None], axis=-1)[..., 0],
        "fkl": jnp.sum(p * (lp - lq), axis=-1),
        "rkl": jnp.sum(q * (lq - lp), axis=-1),
        "jsd": 0.5 * jnp.sum(p * (lp - lm), axis=-1) + 0.5 * jnp.sum(q * (lq - lm), axis=-1),
        "H(q)": -jnp.sum(q * lq, axis=-1),
        "H(p)": -jnp.sum(p * lp, axis=-1),
        "agree": (jnp.argmax(lq, -1) == jnp.argmax(lp, -1)).astype(jnp.float32),
        "q(top-p)": jnp.take_along_axis(q, jnp.argmax(lp, -1)[..., None], axis=-1)[..., 0],
    }
    out = {k: jnp.sum(v * m) for k, v in per.items()}
    out["tokens"] = jnp.sum(m)
    return out


def measure(teacher_dir: str, student_dirs: list[str], *, batches: int, batch_size: int
            ) -> dict:
    if not student_dirs:
        raise ConfigError("--students is empty; give comma-separated student run directories.")
    teacher = load_run(teacher_dir)
    data_dir = teacher.manifest.get("data", {}).get("data_dir", "")
    students = [load_run(d) for d in student_dirs]
    for s in students:
        if s.cfg.vocab_size != teacher.cfg.vocab_size:
            raise ConfigError(f"student {s.run_dir!r} has vocabulary size {s.cfg.vocab_size} "
                              f"but the teacher has {teacher.cfg.vocab_size}.")
    ds = make_dataset(data_dir, "validation", seq_len=teacher.seq_len,
                      global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                      process_index=0, process_count=1)
    rows = list(_take(ds, batches))
    if not rows:
        raise DataError(f"the validation split of {data_dir!r} is empty.")

    def forward(graphdef):
        return jax.jit(lambda p, b: transformer.apply(graphdef, p, b["inputs"],
                                                      positions=b["positions"],
                                                      segment_ids=b["segment_ids"]))

    stats = jax.jit(token_stats)
    t_fwd = forward(teacher.graphdef)
    t_logits = [t_fwd(teacher.params, b) for b in rows]
    result = {"teacher": teacher.run_dir, "teacher_step": teacher.step, "data_dir": data_dir,
              "batches": len(rows), "batch_size": batch_size, "seq_len": teacher.seq_len,
              "students": {}}
    for s in [teacher, *students]:
        s_fwd = forward(s.graphdef)
        total: dict[str, float] = {}
        for b, tl in zip(rows, t_logits):
            sums = stats(s_fwd(s.params, b), tl, b["targets"], b["loss_mask"])
            for k, v in jax.device_get(sums).items():
                total[k] = total.get(k, 0.0) + float(v)
        n = total.pop("tokens")
        name = "teacher" if s is teacher else s.run_dir
        result["students"][name] = {"tokens": n, "step": s.step,
                                    "distill": s.manifest.get("distill"),
                                    **{k: v / n for k, v in total.items()}}
    return result


def _take(ds, n: int):
    for i, batch in enumerate(ds):
        if i >= n:
            return
        yield {k: jnp.asarray(v) for k, v in batch.items()}


def print_table(r: dict) -> None:
    print(f"\nteacher {r['teacher']} step {r['teacher_step']}; {r['batches']} validation batches "
          f"of {r['batch_size']} x {r['seq_len']}; nats per token")
    print("| run | " + " | ".join(STATS) + " |\n|---|" + "---|" * len(STATS))
    for name, s in r["students"].items():
        label = name if name == "teacher" else os.path.basename(os.path.normpath(name))
        print(f"| {label} | " + " | ".join(f"{s[k]:.3f}" for k in STATS) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.distill_divergences",
                                description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--students", required=True, help="comma-separated run directories")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        r = measure(a.teacher, [s for s in a.students.split(",") if s], batches=a.batches,
                    batch_size=a.batch_size)
    except (ConfigError, DataError) as e:
        print(f"distill_divergences: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print_table(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
