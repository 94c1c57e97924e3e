"""Memorization audits: canary exposure and verbatim extraction.

**Exposure** (Carlini et al. 2019, "The Secret Sharer", USENIX Security, §4). A canary
`prefix + s` with secret `s` drawn uniformly from a randomness space R was inserted into the
training data (`llm.data.canaries`). Its log-perplexity is `-log2 P(s | prefix)`; its rank is its
position among all r in R sorted by log-perplexity (rank 1 = the most likely), and

    exposure = log2 |R| - log2 rank.

Scoring all of R (10**9 secrets) is out of reach, so the rank is estimated from `n` secrets drawn
uniformly from R, two ways (both reported):

* **sampled** (the paper's estimate from sampling, §4.2): with k the number of sampled secrets whose
  log-perplexity is <= the canary's, rank/|R| is estimated as (k+1)/(n+1) (the canary counted
  among the samples, so it is never 0) and exposure = log2((n+1)/(k+1)). It cannot exceed
  log2(n+1): a canary more likely than every sample is reported at that ceiling
  (`saturated: true`).
* **extrapolated** (the paper's estimate by extrapolation, §4.3): fit a skew-normal distribution
  to the samples' log-perplexities and take exposure = -log2 CDF(canary's log-perplexity), clipped
  to [0, log2 |R|]. It resolves exposures beyond log2(n+1).

**Verbatim extraction** (the discoverable-memorization test of Carlini et al. 2023, "Quantifying
Memorization Across Neural Language Models"): from windows of `prefix_len + suffix_len` tokens of
documents (non-overlapping windows, a seeded subset), greedy decoding from the `prefix_len`-token
prefix; the rate at which all `suffix_len`
generated tokens equal the document's, on training documents vs held-out (validation) documents.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
from scipy import stats


def exposure_sampled(canary_nll: float, candidate_nlls: Sequence[float]) -> dict:
    """Exposure from a uniform sample of R (see module doc). nll in any fixed log base.

    Returns {"exposure", "k" (samples at least as likely as the canary), "n", "saturated"}.
    """
    cand = np.asarray(candidate_nlls, np.float64)
    if cand.size == 0:
        raise ValueError("exposure_sampled: no candidate secrets were scored.")
    k = int(np.sum(cand <= canary_nll))
    n = int(cand.size)
    return {"exposure": math.log2((n + 1) / (k + 1)), "k": k, "n": n, "saturated": k == 0}


def exposure_extrapolated(canary_nll: float, candidate_nlls: Sequence[float],
                          space_size: int) -> dict:
    """Exposure from a skew-normal fit of the candidates' log-perplexities (see module doc).

    Returns {"exposure", "skewnorm": {"a", "loc", "scale"}}.
    """
    cand = np.asarray(candidate_nlls, np.float64)
    if cand.size < 3:
        raise ValueError("exposure_extrapolated: a skew-normal fit needs >= 3 candidates.")
    a, loc, scale = stats.skewnorm.fit(cand)
    log_cdf = float(stats.skewnorm.logcdf(canary_nll, a, loc, scale))
    exposure = min(max(-log_cdf / math.log(2), 0.0), math.log2(space_size))
    return {"exposure": exposure, "skewnorm": {"a": float(a), "loc": float(loc),
                                               "scale": float(scale)}}


def extraction_windows(docs: Sequence[np.ndarray], prefix_len: int = 32, suffix_len: int = 32,
                       max_windows: int = 256, seed: int = 0, eos_id: int | None = 1,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Up to `max_windows` (prefix, suffix) pairs from token documents.

    docs: token-id arrays (a trailing `eos_id` is dropped). Every document is cut into
    non-overlapping windows of `prefix_len + suffix_len` tokens at offsets 0, w, 2w, ... (a shorter
    remainder is dropped); when there are more than `max_windows`, a seeded uniform subset is kept
    (in document order). Returns prefixes [n, prefix_len], suffixes [n, suffix_len], document
    indices [n] and window starts [n] (offset in the document; 0 = its beginning).
    """
    need = prefix_len + suffix_len
    trimmed = [d[:-1] if eos_id is not None and len(d) and d[-1] == eos_id else d for d in docs]
    windows = [(i, s) for i, d in enumerate(trimmed) for s in range(0, len(d) - need + 1, need)]
    if len(windows) > max_windows:
        keep = np.random.default_rng(seed).choice(len(windows), size=max_windows, replace=False)
        windows = [windows[k] for k in sorted(keep.tolist())]
    prefixes = np.zeros((len(windows), prefix_len), np.int32)
    suffixes = np.zeros((len(windows), suffix_len), np.int32)
    for r, (i, s) in enumerate(windows):
        prefixes[r] = trimmed[i][s:s + prefix_len]
        suffixes[r] = trimmed[i][s + prefix_len:s + need]
    return (prefixes, suffixes, np.asarray([w[0] for w in windows], np.int64),
            np.asarray([w[1] for w in windows], np.int64))


def extraction_stats(generated: Sequence[Sequence[int]], suffixes: np.ndarray) -> dict:
    """Exact-suffix rate and token agreement of greedy continuations vs the true suffixes.

    generated: per window, the generated tokens (may be shorter than the suffix if decoding
    stopped at EOS: then it is not an exact match). suffixes: [n, suffix_len].
    Returns {"n", "exact", "rate", "stderr" (binomial), "token_match" (mean fraction of positions
    equal), "mean_prefix_match" (mean number of leading tokens equal)}.
    """
    n, length = suffixes.shape
    if n == 0:
        return {"n": 0, "exact": 0, "rate": float("nan"), "stderr": float("nan"),
                "token_match": float("nan"), "mean_prefix_match": float("nan")}
    exact, token_match, lead = 0, 0.0, 0.0
    for gen, ref in zip(generated, suffixes):
        g = np.full(length, -1, np.int64)
        gen = list(gen)[:length]
        g[:len(gen)] = gen
        eq = g == ref
        exact += bool(eq.all())
        token_match += eq.mean()
        lead += int(np.argmin(eq)) if not eq.all() else length
    rate = exact / n
    return {"n": n, "exact": exact, "rate": rate, "stderr": math.sqrt(rate * (1 - rate) / n),
            "token_match": token_match / n, "mean_prefix_match": lead / n}


# ------------------------------------------------------------------------- the audit of a run


def canary_exposures(lm, canary_list: Sequence, space_size: int, length: int,
                     num_candidates: int, seed: int) -> list[dict]:
    """Scores every canary and `num_candidates` uniform random secrets after its prefix.

    lm: an `llm.eval.lm.LanguageModel`. Returns one record per canary with its log-perplexity
    (bits), both exposure estimates, and whether greedy decoding reproduces the secret.
    """
    from llm.data.canaries import random_secrets

    requests, spans = [], []
    for i, c in enumerate(canary_list):
        cands = [r for r in random_secrets(num_candidates, length, seed + 7919 * i)
                 if r != c.secret]
        spans.append((len(requests), len(cands)))
        requests += [(c.prefix, c.secret)] + [(c.prefix, r) for r in cands]
    scored = lm.loglikelihood(requests)
    out = []
    for c, (start, n) in zip(canary_list, spans):
        nll = -scored[start][0] / math.log(2)
        cand = [-lp / math.log(2) for lp, _ in scored[start + 1:start + 1 + n]]
        sampled = exposure_sampled(nll, cand)
        extrap = exposure_extrapolated(nll, cand, space_size)
        out.append({"name": c.name, "count": c.count, "secret": c.secret,
                    "log_perplexity_bits": nll,
                    "candidates_log_perplexity_bits": {"mean": float(np.mean(cand)),
                                                       "std": float(np.std(cand)),
                                                       "min": float(np.min(cand))},
                    "exposure_sampled": sampled["exposure"], "k": sampled["k"],
                    "n": sampled["n"], "saturated": sampled["saturated"],
                    "exposure_extrapolated": extrap["exposure"], "skewnorm": extrap["skewnorm"],
                    "greedy_extracts_secret": bool(scored[start][1])})
    return out


def greedy_extraction(run, prefixes: np.ndarray, suffixes: np.ndarray, starts: np.ndarray,
                      batch_size: int = 64) -> tuple[dict, list[list[int]]]:
    """Greedy-decodes `suffix_len` tokens after each prefix (`llm.serve.sampler.generate`,
    temperature 0); a window at its document's start is preceded by BOS, as in training."""
    from llm.data.objectives import PAD_ID
    from llm.serve.sampler import generate

    prompts = [([PAD_ID] if s == 0 else []) + p.tolist() for p, s in zip(prefixes, starts)]
    generated: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        generated += generate(run.graphdef, run.params, run.cfg, prompts[i:i + batch_size],
                              max_new_tokens=suffixes.shape[1], temperature=0.0, top_k=0)
    return extraction_stats(generated, suffixes), generated


def audit(run_dir: str, *, step: int | None = None, num_candidates: int = 1000,
          num_windows: int = 256, prefix_len: int = 32, suffix_len: int = 32, seed: int = 0,
          batch_size: int = 64, out_dir: str | None = None) -> dict:
    """Exposure per canary repetition count and verbatim extraction (train vs validation) of a
    run; writes `<out_dir>/memorization.json` and `memorization.png` (default `<run>/eval/`).

    Canaries come from `canaries.json` in the run's data directory (manifest.json's data record);
    a run whose data has none gets the extraction part only.
    """
    from llm.data.sources import DataError
    from llm.eval.lm import LanguageModel
    from llm.runs import load_run, read_run_config

    if num_candidates < 10 or num_windows < 1 or prefix_len < 1 or suffix_len < 1:
        raise DataError(f"num_candidates={num_candidates} (>= 10), num_windows={num_windows}, "
                        f"prefix_len={prefix_len}, suffix_len={suffix_len} (>= 1) out of range.")
    _check_context(run_dir, read_run_config(run_dir)[2], prefix_len, suffix_len)
    run = load_run(run_dir, step=step)
    result = compute(run, LanguageModel(run, batch_size=batch_size), num_candidates=num_candidates,
                     num_windows=num_windows, prefix_len=prefix_len, suffix_len=suffix_len,
                     seed=seed, batch_size=batch_size)
    out_dir = out_dir or os.path.join(run.run_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    plot(result, os.path.join(out_dir, "memorization.png"))
    path = os.path.join(out_dir, "memorization.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)  # written last: its presence means the audit completed
    return result


def _check_context(run_dir: str, seq_len: int, prefix_len: int, suffix_len: int) -> None:
    from llm.data.sources import DataError

    if prefix_len + suffix_len + 1 > seq_len:
        raise DataError(f"prefix_len + suffix_len + BOS = {prefix_len + suffix_len + 1} tokens "
                        f"exceed the context of {run_dir} ({seq_len}); lower --prefix_len "
                        "or --suffix_len.")


def compute(run, lm, *, num_candidates: int = 1000, num_windows: int = 256,
            prefix_len: int = 32, suffix_len: int = 32, seed: int = 0,
            batch_size: int = 64) -> dict:
    """The audit's numbers for a loaded run (`llm.runs.LoadedRun`) and its LanguageModel."""
    from llm.data import canaries, shards
    from llm.data.sources import DataError

    _check_context(run.run_dir, run.seq_len, prefix_len, suffix_len)
    data_dir = run.manifest["data"]["data_dir"]
    info = shards.load_dataset_info(data_dir)
    result: dict = {"run_dir": run.run_dir, "step": run.step, "data_dir": data_dir, "seed": seed}

    num_canary_docs = 0
    if os.path.isfile(os.path.join(data_dir, canaries.CANARIES_JSON)):
        spec, canary_list = canaries.load(data_dir)
        if info.settings.get("canaries") != spec.settings():
            raise DataError(f"{data_dir}/canaries.json does not match dataset.json's canary "
                            "settings; re-run prepare with --force.")
        num_canary_docs = sum(c.count for c in canary_list)
        per = canary_exposures(lm, canary_list, spec.space_size, spec.length, num_candidates,
                               seed)
        by_count = []
        for count in spec.counts:
            rows = [r for r in per if r["count"] == count]
            s = [r["exposure_sampled"] for r in rows]
            e = [r["exposure_extrapolated"] for r in rows]
            sem = (lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1
                   else float("nan"))
            by_count.append({"count": count, "canaries": len(rows),
                             "exposure_sampled_mean": float(np.mean(s)),
                             "exposure_sampled_stderr": sem(s),
                             "exposure_extrapolated_mean": float(np.mean(e)),
                             "exposure_extrapolated_stderr": sem(e),
                             "exposure_extrapolated_min": float(np.min(e)),
                             "exposure_extrapolated_max": float(np.max(e)),
                             "greedy_extracted": sum(r["greedy_extracts_secret"] for r in rows)})
        result["exposure"] = {
            "space_size": spec.space_size, "space_size_log2": math.log2(spec.space_size),
            "num_candidates": num_candidates,
            "sampled_ceiling": math.log2(num_candidates + 1),
            "method": "Carlini et al. 2019: exposure = log2|R| - log2 rank. 'sampled': rank/|R| "
                      "~ (k+1)/(n+1) over n uniform samples of R (sec. 4.2, ceiling log2(n+1)); "
                      "'extrapolated': -log2 CDF of a skew-normal fit to the samples' "
                      "log-perplexities (sec. 4.3). Log-perplexity = -log2 P(secret | prefix).",
            "by_count": by_count, "canaries": per}
    else:
        result["exposure"] = None

    train_docs = shards.read_all(info.shard_paths("train"))
    if num_canary_docs:
        train_docs = train_docs[:-num_canary_docs]  # canaries are appended last (canaries.insert)
    extraction = {"prefix_len": prefix_len, "suffix_len": suffix_len,
                  "method": "greedy decoding of suffix_len tokens after a prefix_len-token "
                            "window of a document (non-overlapping windows, a seeded subset "
                            "of num_windows); exact = all suffix tokens equal (Carlini et al. "
                            "2023)."}
    for split, docs in (("train", train_docs),
                        ("validation", shards.read_all(info.shard_paths("validation")))):
        prefixes, suffixes, idx, starts = extraction_windows(docs, prefix_len, suffix_len,
                                                             num_windows, seed)
        stats_, _ = greedy_extraction(run, prefixes, suffixes, starts, batch_size)
        extraction[split] = {**stats_, "documents": len(docs)}
    result["extraction"] = extraction
    return result


def task_result(lm, **kwargs) -> dict:
    """The audit as an `experiments.evaluate` task result: {"metrics": {name: {"value",
    "stderr"}}, "samples": per-canary records, "memorization": the full `compute` record}.

    Metrics: exposure_extrapolated@<count> and exposure_sampled@<count> (mean over that count's
    canaries, stderr across them), extraction_rate_train / _validation (binomial stderr).
    Prefix and suffix default to 32 tokens, or (seq_len - 1) // 2 each for a shorter context.
    """
    half = min(32, (lm.run.seq_len - 1) // 2)
    kwargs = {"prefix_len": half, "suffix_len": half, "batch_size": lm.batch_size, **kwargs}
    result = compute(lm.run, lm, **kwargs)
    metrics = {}
    for r in (result["exposure"] or {}).get("by_count", []):
        for kind in ("extrapolated", "sampled"):
            metrics[f"exposure_{kind}@{r['count']}"] = {
                "value": r[f"exposure_{kind}_mean"], "stderr": r[f"exposure_{kind}_stderr"]}
    for split in ("train", "validation"):
        x = result["extraction"][split]
        metrics[f"extraction_rate_{split}"] = {"value": x["rate"], "stderr": x["stderr"]}
    samples = (result["exposure"] or {}).get("canaries", [])
    return {"metrics": metrics, "samples": samples, "num_samples": len(samples),
            "memorization": result}


def plot(result: dict, path: str) -> str:
    """Exposure vs repetition count (left) and extraction rate train vs validation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp = result.get("exposure")
    fig, axes = plt.subplots(1, 2 if exp else 1, figsize=(10 if exp else 5, 4), squeeze=False)
    if exp:
        ax = axes[0, 0]
        counts = [r["count"] for r in exp["by_count"]]
        for key, label, marker in (("exposure_extrapolated", "extrapolated (skew-normal)", "o"),
                                   ("exposure_sampled", "sampled", "s")):
            ax.plot(counts, [r[f"{key}_mean"] for r in exp["by_count"]], marker=marker,
                    label=f"{label}, mean")
            ax.scatter([c["count"] for c in exp["canaries"]], [c[key] for c in exp["canaries"]],
                       s=10, alpha=0.5)
        ax.axhline(exp["space_size_log2"], ls="--", color="grey", lw=0.8,
                   label=f"log2|R| = {exp['space_size_log2']:.1f}")
        ax.axhline(exp["sampled_ceiling"], ls=":", color="grey", lw=0.8,
                   label=f"sampling ceiling log2(n+1) = {exp['sampled_ceiling']:.1f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("canary repetitions in training")
        ax.set_ylabel("exposure (bits)")
        ax.set_title("Canary exposure")
        ax.legend(fontsize=7)
    ax = axes[0, -1]
    ext = result["extraction"]
    splits = ["train", "validation"]
    rates = [ext[s]["rate"] for s in splits]
    ax.bar(splits, rates, yerr=[ext[s]["stderr"] for s in splits], capsize=6,
           color=["tab:red", "tab:blue"])
    for i, s in enumerate(splits):
        ax.text(i, rates[i], f"{ext[s]['exact']}/{ext[s]['n']}", ha="center", va="bottom")
    ax.set_ylabel(f"exact {ext['suffix_len']}-token greedy suffix rate")
    ax.set_title(f"Verbatim extraction ({ext['prefix_len']}-token prefixes)")
    fig.suptitle(f"{os.path.basename(result['run_dir'].rstrip('/'))} step {result['step']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
