"""Which confidence signal of the local answer predicts its quality? An offline study for the
hybrid router (`llm/serve/router.py`), on the held-out next-line task of `tools/bench_router.py`.

    python -m tools.router_confidence --local_run=runs/quickstart \\
        --remote_run=runs/compress/larger --per_file=8 --out=runs/router_confidence

Both models answer every prompt greedily (`sampler.generate`, <= 24 tokens, BOS + prompt,
the answer cut after its first newline token, as the router's `stop: ["\\n"]` ends it); a
teacher-forced forward pass of the local model over prompt + answer gives, per answer token,
its logprob and the entropy of the whole next-token distribution. Signals (higher = more
confident): mean token logprob (the router's), summed logprob, min token logprob, first-token
logprob, the sum over sqrt(length) (a softer length normalisation), minus the mean and minus the
max entropy, and the mean top-1 margin (p1 - p2).

Quality: prefix accuracy of the answer's line (`bench_router.score`). The files are split in two
by a hash of their id *before anything is measured*: on the calibration half the median local
quality fixes the "good answer" label and every signal's AUROC for it is computed, and the
signal with the best calibration AUROC is chosen; the evaluation half then reports every
signal's AUROC (good answer; and "the remote is better", the decision the router actually
makes) and the routed quality at the calibration half's 20/40/60/80 % deferral thresholds.
Writes results.json (per-prompt rows included) and confidence.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np

from tools.bench_router import fit_prompt, held_out_prompts, score

MAX_TOKENS = 24
SIGNALS = ("mean_logprob", "sum_logprob", "min_logprob", "first_logprob", "sqrt_norm_logprob",
           "neg_mean_entropy", "neg_max_entropy", "mean_margin")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def answer_tokens(tokenizer, tokens: list[int]) -> list[int]:
    """The answer up to and including its first token whose text holds a newline."""
    for k in range(len(tokens)):
        if "\n" in tokenizer.decode(tokens[: k + 1]):
            return tokens[: k + 1]
    return tokens


def answers(run, prompts: list[list[int]], batch: int = 32) -> list[list[int]]:
    from llm.serve.sampler import generate

    out = []
    for i in range(0, len(prompts), batch):
        out += generate(run.graphdef, run.params, run.cfg, prompts[i:i + batch],
                        max_new_tokens=MAX_TOKENS, temperature=0.0, top_k=0)
    return [answer_tokens(run.tokenizer, a) for a in out]


def signals(run, prompts: list[list[int]], outs: list[list[int]]) -> list[dict]:
    """Per answer: the SIGNALS, from one teacher-forced forward pass of `run`."""
    import jax

    from llm.model import transformer

    apply = jax.jit(lambda p, x: transformer.apply(run.graphdef, p, x))
    rows = []
    for prompt, out in zip(prompts, outs):
        if not out:
            rows.append({s: 0.0 for s in SIGNALS} | {"tokens": 0})
            continue
        ids = np.asarray([prompt + out], np.int32)
        pad = -ids.shape[1] % 64  # a few padded shapes, not one compile per length
        logits = np.asarray(apply(run.params, np.pad(ids, ((0, 0), (0, pad)))))[0]
        logits = logits[len(prompt) - 1:len(prompt) - 1 + len(out)].astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        chosen = logp[np.arange(len(out)), out]
        p = np.exp(logp)
        entropy = -(p * logp).sum(-1)
        top2 = np.sort(p, axis=-1)[:, -2:]
        rows.append({"mean_logprob": chosen.mean(), "sum_logprob": chosen.sum(),
                     "min_logprob": chosen.min(), "first_logprob": chosen[0],
                     "sqrt_norm_logprob": chosen.sum() / np.sqrt(len(out)),
                     "neg_mean_entropy": -entropy.mean(), "neg_max_entropy": -entropy.max(),
                     "mean_margin": (top2[:, 1] - top2[:, 0]).mean(), "tokens": len(out)})
    return [{k: float(v) for k, v in r.items()} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_run", required=True)
    parser.add_argument("--remote_run", required=True)
    parser.add_argument("--data_dir", default=None, help="default: the local run's manifest")
    parser.add_argument("--per_file", type=int, default=8, help="lines per held-out file")
    parser.add_argument("--prompts", type=int, default=1000, help="at most this many")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm.runs import load_run
    from llm.serve.engine import BOS_ID

    os.makedirs(args.out, exist_ok=True)
    load = os.getloadavg()
    local, remote = load_run(args.local_run), load_run(args.remote_run)
    data_dir = args.data_dir or local.manifest["data"]["data_dir"]
    tasks = held_out_prompts(data_dir, args.prompts, per_file=args.per_file, with_source=True)
    context = min(local.seq_len, remote.seq_len) - 2 - MAX_TOKENS
    tasks = [(fit_prompt(p, local.tokenizer, context), ref, doc) for p, ref, doc in tasks]
    # Calibration / evaluation split by file, fixed before anything is measured.
    half = np.array([int(hashlib.sha256(doc.encode()).hexdigest(), 16) % 2 for _, _, doc in
                     tasks]) == 0
    prompts = [[BOS_ID, *local.tokenizer.encode(p)] for p, _, _ in tasks]
    local_out = answers(local, prompts)
    remote_out = answers(remote, prompts)
    sig = signals(local, prompts, local_out)
    rows = []
    for (_, ref, doc), lo, ro, s, cal in zip(tasks, local_out, remote_out, sig, half):
        q_local = score(local.tokenizer.decode(lo), ref)[1]
        q_remote = score(remote.tokenizer.decode(ro), ref)[1]
        rows.append({"doc": doc, "calibration": bool(cal), "local_quality": q_local,
                     "remote_quality": q_remote, **s})
    q = np.array([r["local_quality"] for r in rows])
    gain = np.array([r["remote_quality"] - r["local_quality"] for r in rows])
    good_cut = float(np.median(q[half]))
    result = {"local": f"{args.local_run} step {local.step}",
              "remote": f"{args.remote_run} step {remote.step}", "prompts": len(rows),
              "files": len({r["doc"] for r in rows}), "calibration_prompts": int(half.sum()),
              "evaluation_prompts": int((~half).sum()), "good_label": f"local prefix accuracy > "
              f"{good_cut:.3f} (calibration median)", "load_average": load, "signals": {}}
    for name in SIGNALS:
        x = np.array([r[name] for r in rows])
        result["signals"][name] = {
            "calibration_auroc_good": auroc(x[half], q[half] > good_cut),
            "evaluation_auroc_good": auroc(x[~half], q[~half] > good_cut),
            "evaluation_auroc_remote_better": auroc(-x[~half], gain[~half] > 0),
            "evaluation_spearman_quality": float(np.corrcoef(
                np.argsort(np.argsort(x[~half])), np.argsort(np.argsort(q[~half])))[0, 1])}
    chosen = max(SIGNALS, key=lambda n: result["signals"][n]["calibration_auroc_good"])
    result["chosen_on_calibration"] = chosen
    # Routed quality on the evaluation half: defer when the signal is below the calibration
    # half's 20/40/60/80 % quantile.
    curves = {}
    for name in sorted({chosen, "mean_logprob"}):
        x = np.array([r[name] for r in rows])
        points = [{"deferred": 0.0, "quality": float(q[~half].mean())}]
        for frac in (0.2, 0.4, 0.6, 0.8):
            t = float(np.quantile(x[half], frac))
            defer = x[~half] < t
            routed = np.where(defer, q[~half] + gain[~half], q[~half])
            points.append({"threshold": t, "deferred": float(defer.mean()),
                           "quality": float(routed.mean())})
        points.append({"deferred": 1.0, "quality": float((q + gain)[~half].mean())})
        curves[name] = points
    result["routed_quality_evaluation"] = curves
    result["load_average_end"] = os.getloadavg()
    result["rows"] = rows
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = list(SIGNALS)
    ax[0].barh(names, [result["signals"][n]["evaluation_auroc_good"] for n in names],
               label="good local answer")
    ax[0].barh(names, [result["signals"][n]["evaluation_auroc_remote_better"] for n in names],
               height=0.4, label="remote better (signal negated)")
    ax[0].axvline(0.5, color="k", lw=0.8)
    ax[0].set_xlabel("AUROC, evaluation half")
    ax[0].legend(fontsize=8)
    for name, points in curves.items():
        ax[1].plot([p["deferred"] for p in points], [p["quality"] for p in points], "o-",
                   label=name)
    ax[1].set_xlabel("fraction deferred (evaluation half)")
    ax[1].set_ylabel("prefix accuracy")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "confidence.png"), dpi=120)
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
