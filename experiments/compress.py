"""Compress a trained run and report what it cost and bought.

    python -m experiments.compress --run_dir=runs/quickstart --method=int8[,wanda+ft,...] \
        [--out_dir=D] \
        [--gin_file=gin_configs/debug/quantize_tiny.gin] [--gin_param=compress.group_size=64]

Methods (`METHODS`):
  int8, int4, nf4         weight-only round-to-nearest (int8 per channel, int4/NF4 group-wise)
  gptq-int8, gptq-int4, gptq-nf4   GPTQ on a calibration batch from the training split
  awq-int4, awq-nf4       AWQ (activation-aware scales folded into the norms, clip search)
  w8a8                    int8 weights and per-token int8 activations: integer matmuls
  qat-int8, qat-int4, qat-nf4      fake-quantized fine-tune (STE), then round-to-nearest
  magnitude, wanda        unstructured pruning at compress.sparsity (per layer)
  2:4                     semi-structured 2-of-4 pruning (Wanda scores)
A pruning method with "+ft" (e.g. wanda+ft), or any with compress.finetune_steps > 0, gets a
recovery fine-tune with its masks fixed (compress.finetune_steps, or 100); QAT always
fine-tunes (compress.finetune_steps or 100).

Writes <out_dir>/compress/<name>/ (name: the method, ':' as 'of', '-ft<steps>' after a recovery
fine-tune; out_dir defaults to run_dir):
  checkpoint/   the compressed params (packed integer codes + scales for quantized weights)
  report.json, report.md   validation bits/byte and perplexity against the original,
                checkpoint bytes, parameter count and non-zeros, prefill and decode tokens/s of
                the original and the compressed model measured interleaved in this process
and <out_dir>/compress/quality_vs_size.png (+ summary.md) over every method reported there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from llm.compress import awq, calibrate, finetune, gptq, prune
from llm.compress import quantize as Q
from llm.compress.checkpoint import directory_bytes, save_compressed
from llm.config import ConfigError, parse_gin
from llm.data.pipeline import make_dataset
from llm.data.shards import load_dataset_info
from llm.data.sources import DataError
from llm.eval.perplexity import summarize
from llm.model import transformer
from llm.runs import LoadedRun, load_run
from llm.serve.sampler import generate
from llm.train.loss import decoder_loss

QUANT = ("int8", "int4", "nf4")
METHODS = (*QUANT, "w8a8", *(f"gptq-{m}" for m in QUANT), "awq-int4", "awq-nf4",
           *(f"qat-{m}" for m in QUANT), "magnitude", "wanda", "2:4")


def method_name(method: str, finetune_steps: int) -> str:
    name = method.replace(":", "of")
    if method in prune.METHODS and finetune_steps > 0:
        name += f"-ft{finetune_steps}"
    return name


# ----------------------------------------------------------------------------- measurement

def validation_metrics(run: LoadedRun, params: dict, data_dir: str, *, batch_size: int,
                       max_batches: int | None) -> dict:
    """Loss, perplexity, accuracy and bits/byte over the validation split (or its first
    max_batches batches), params may hold QArrays (dequantized inside the jitted forward)."""
    info = load_dataset_info(data_dir).splits["validation"]
    loss_fn = jax.jit(decoder_loss(run.graphdef))
    ds = make_dataset(data_dir, "validation", seq_len=run.seq_len, global_batch_size=batch_size,
                      seed=0, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    total: dict[str, float] = {}
    for i, batch in enumerate(ds):
        if max_batches is not None and i >= max_batches:
            break
        sums = jax.device_get(loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(np.asarray(v))
    if not total:
        raise DataError(f"the validation split of {data_dir!r} is empty.")
    return summarize(total, bytes_per_token=info.num_bytes / info.num_tokens)


def speed(run: LoadedRun, variants: dict[str, dict], *, prefill_len: int, decode_tokens: int,
          repeats: int) -> dict[str, dict]:
    """Prefill tokens/s (one jitted forward over [1, prefill_len]) and decode tokens/s (the
    KV-cache sampler, greedy, batch 1, a 16-token prompt: decode_tokens / time of the whole
    call, its small prefill included) of every params variant, measured interleaved (A, B, A,
    B, ...) after a warm-up. The best of `repeats` (least disturbed by other load) is kept."""
    ids = jnp.asarray(np.arange(prefill_len, dtype=np.int32)[None] % run.cfg.vocab_size)
    forward = jax.jit(lambda p, x: transformer.apply(run.graphdef, p, x))
    prompt = [[int(t) for t in np.asarray(ids[0, :16])]]

    def gen(p):
        return generate(run.graphdef, p, run.cfg, prompt, max_new_tokens=decode_tokens,
                        temperature=0.0, eos_id=-1)

    times = {name: {"prefill": [], "decode": []} for name in variants}
    for p in variants.values():  # compile
        forward(p, ids).block_until_ready()
        gen(p)
    for _ in range(repeats):
        for name, p in variants.items():
            t = time.perf_counter()
            forward(p, ids).block_until_ready()
            times[name]["prefill"].append(time.perf_counter() - t)
            t = time.perf_counter()
            gen(p)
            times[name]["decode"].append(time.perf_counter() - t)
    return {name: {"prefill_tokens_per_s": prefill_len / min(t["prefill"]),
                   "decode_tokens_per_s": decode_tokens / min(t["decode"])}
            for name, t in times.items()}


def remeasure_speed(out_root: str, repeats: int) -> None:
    """Measure prefill/decode again for every report under out_root in one process (original
    and each compressed checkpoint interleaved), rewrite the reports and the summary."""
    from llm.compress.checkpoint import load_compressed_run

    names = sorted(n for n in os.listdir(out_root)
                   if os.path.isfile(os.path.join(out_root, n, "report.json")))
    if not names:
        raise DataError(f"no report.json under {out_root!r}; run experiments.compress first.")
    reports = {}
    for n in names:
        with open(os.path.join(out_root, n, "report.json")) as f:
            reports[n] = json.load(f)
    first = reports[names[0]]
    run = load_run(first["run_dir"], step=first["step"])
    sc = first["speed_conditions"]
    variants = {"original": run.params}
    for n in names:
        variants[n] = load_compressed_run(os.path.join(out_root, n, "checkpoint")).params
    load_before = load_average()
    speeds = speed(run, variants, prefill_len=sc["prefill_len"],
                   decode_tokens=sc["decode_tokens"], repeats=repeats)
    load_after = load_average()
    for n, r in reports.items():
        r["original"].update(speeds["original"])
        r["compressed"].update(speeds[n])
        r["delta"]["prefill_speedup"] = (speeds[n]["prefill_tokens_per_s"]
                                         / speeds["original"]["prefill_tokens_per_s"])
        r["delta"]["decode_speedup"] = (speeds[n]["decode_tokens_per_s"]
                                        / speeds["original"]["decode_tokens_per_s"])
        r["speed_conditions"].update(repeats=repeats, load_average_1m=[load_before, load_after],
                                     remeasured_with=len(variants))
        with open(os.path.join(out_root, n, "report.json"), "w") as f:
            json.dump(r, f, indent=2)
        with open(os.path.join(out_root, n, "report.md"), "w") as f:
            f.write(report_markdown(r))
    plot_all(out_root)


def load_average() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- compression

@gin.configurable
def compress(run_dir: str, method: str, out_dir: str | None = None, group_size: int = 128,
             embedding_method: str | None = None, sparsity: float = 0.5,
             calibration_batches: int = 8, calibration_batch_size: int = 8,
             finetune_steps: int = 0, finetune_lr: float = 3e-4, finetune_batch_size: int = 8,
             eval_batch_size: int = 8,
             eval_batches: int | None = None, prefill_len: int = 256, decode_tokens: int = 64,
             speed_repeats: int = 3, gptq_damp: float = 0.01, awq_clip: bool = True,
             seed: int = 0,
             tag: str | None = None) -> dict:
    """Compress the run at `run_dir` with `method` and write the report (module docstring).

    group_size: int4/NF4 rows per scale (must divide every contraction dim). embedding_method:
    the embedding table's quantization if it should differ (e.g. "int8" under int4).
    calibration_*: rows of the training split for GPTQ / Wanda / 2:4. eval_batches: None
    scores the whole validation split. awq_clip: AWQ's per-group clip search after
    scaling. tag: appended to the output directory name (to keep
    variants of one method apart, e.g. tag="emb8" with embedding_method="int8"). Returns the
    report record.
    """
    if method.endswith("+ft") and method[:-3] in prune.METHODS:
        method = method[:-3]
        finetune_steps = finetune_steps or 100
    if method not in METHODS:
        raise ConfigError(f"--method={method!r} is not one of {', '.join(METHODS)} (a pruning "
                          "method may end in +ft).")
    if method in ("magnitude", "wanda"):
        prune.check_sparsity(sparsity)
    if method.startswith("qat-") and finetune_steps <= 0:
        finetune_steps = 100
    run = load_run(run_dir)
    data_dir = run.manifest.get("data", {}).get("data_dir", "")
    _, abstract_params, axes = transformer.abstract(run.cfg)
    quant = ("int8" if method == "w8a8" else
             method.split("-")[-1] if method.split("-")[-1] in QUANT else None)
    if quant:  # check the group size against every weight before any work
        Q.check_params(abstract_params, axes, quant, group_size, embedding_method)
    name = method_name(method, finetune_steps) + (f"-{tag}" if tag else "")
    out_root = os.path.join(os.path.abspath(out_dir or run_dir), "compress")
    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    print(f"compress: {run.name} step {run.step} ({run.cfg.num_params() / 1e6:.2f}M params) "
          f"-> {method} in {out}")

    settings: dict = {"method": method}
    t0 = time.time()
    grams = None
    if method.startswith(("gptq-", "awq-")) or method in ("wanda", "2:4"):
        batches = calibrate.calibration_batches(
            data_dir, num_batches=calibration_batches, batch_size=calibration_batch_size,
            seq_len=run.seq_len, seed=seed)
        grams, act_means, tokens = calibrate.input_statistics(run.graphdef, run.params, batches)
        settings.update(calibration_tokens=tokens, calibration_split="train")
    finetune_losses = None
    if quant:
        settings.update(group_size=group_size if quant != "int8" else "per-channel",
                        embedding_method=embedding_method or quant)
        if method.startswith("gptq-"):
            compressed = gptq.gptq_params(run.params, axes, grams, method=quant,
                                          group_size=group_size, damp=gptq_damp,
                                          embedding_method=embedding_method)
            settings["gptq_damp"] = gptq_damp
        elif method.startswith("awq-"):
            compressed, alphas = awq.awq_params(run.params, axes, grams, act_means, method=quant,
                                                group_size=group_size, clip=awq_clip,
                                                embedding_method=embedding_method)
            settings.update(awq_clip=awq_clip, awq_alpha=alphas)
        else:
            params = run.params
            if method.startswith("qat-"):
                params, finetune_losses = finetune.finetune(
                    run.graphdef, run.params,
                    finetune.qat_transform(axes, quant, group_size, embedding_method),
                    data_dir=data_dir, steps=finetune_steps, seq_len=run.seq_len,
                    batch_size=finetune_batch_size, learning_rate=finetune_lr, seed=seed)
                settings.update(finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                            finetune_batch_size=finetune_batch_size)
            compressed = Q.quantize_params(params, axes, method=quant, group_size=group_size,
                                           embedding_method=embedding_method)
            if method == "w8a8":
                compressed = Q.int8_activations(compressed)
                settings["activations"] = "int8 per token"
    else:
        masks = prune.compute_masks(run.params, axes, method, sparsity, grams)
        compressed = prune.apply_masks(run.params, masks)
        settings.update(sparsity=0.5 if method == "2:4" else sparsity)
        if finetune_steps > 0:
            compressed, finetune_losses = finetune.finetune(
                run.graphdef, compressed, finetune.mask_transform(masks), data_dir=data_dir,
                steps=finetune_steps, seq_len=run.seq_len, batch_size=finetune_batch_size,
                learning_rate=finetune_lr, seed=seed)
            settings.update(finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                            finetune_batch_size=finetune_batch_size)
    compress_s = time.time() - t0

    ckpt_bytes = save_compressed(os.path.join(out, "checkpoint"), compressed, method=method,
                                 source_run=run.run_dir, step=run.step,
                                 extra={"settings": settings})
    original_bytes = _original_bytes(out_root, run)

    print("compress: scoring the validation split (original, compressed)")
    kw = dict(batch_size=eval_batch_size, max_batches=eval_batches)
    base_metrics = _original_metrics(out_root, run, data_dir, kw)
    new_metrics = validation_metrics(run, compressed, data_dir, **kw)
    print("compress: timing prefill and decode (interleaved)")
    load_before = load_average()
    speeds = speed(run, {"original": run.params, "compressed": compressed},
                   prefill_len=min(prefill_len, run.seq_len), decode_tokens=decode_tokens,
                   repeats=speed_repeats)
    load_after = load_average()
    sample = run.tokenizer.decode(generate(run.graphdef, compressed, run.cfg,
                                           [run.tokenizer.encode("def fibonacci(n):\n")],
                                           max_new_tokens=48, temperature=0.0)[0])

    count, nonzero = prune.count_nonzero(Q.dequantize_params(compressed))
    base_count, base_nonzero = prune.count_nonzero(run.params)
    record = {
        "run_dir": run.run_dir, "step": run.step, "method": method, "name": name,
        "settings": settings, "compress_seconds": compress_s,
        "original": {**base_metrics, "checkpoint_bytes": original_bytes,
                     "array_bytes": Q.param_bytes(run.params), "params": base_count,
                     "nonzero": base_nonzero, **speeds["original"]},
        "compressed": {**new_metrics, "checkpoint_bytes": ckpt_bytes,
                       "array_bytes": Q.param_bytes(compressed), "params": count,
                       "nonzero": nonzero, **speeds["compressed"]},
        "delta": {
            "perplexity_pct": 100 * (new_metrics["perplexity"] / base_metrics["perplexity"] - 1),
            "bits_per_byte": new_metrics["bits_per_byte"] - base_metrics["bits_per_byte"],
            "size_ratio": ckpt_bytes / original_bytes,
            "prefill_speedup": speeds["compressed"]["prefill_tokens_per_s"]
            / speeds["original"]["prefill_tokens_per_s"],
            "decode_speedup": speeds["compressed"]["decode_tokens_per_s"]
            / speeds["original"]["decode_tokens_per_s"]},
        "eval": {"split": "validation", "batches": eval_batches or "all",
                 "batch_size": eval_batch_size, "seq_len": run.seq_len},
        "speed_conditions": {"prefill_len": min(prefill_len, run.seq_len),
                             "decode_tokens": decode_tokens, "batch": 1,
                             "repeats": speed_repeats, "backend": jax.default_backend(),
                             "load_average_1m": [load_before, load_after]},
        "finetune_losses": finetune_losses,
        "sample": sample,
        "command": " ".join(["python", "-m", "experiments.compress", *sys.argv[1:]]),
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(record))
    plot_all(out_root)
    d = record["delta"]
    print(f"compress: {name}: perplexity {base_metrics['perplexity']:.4f} -> "
          f"{new_metrics['perplexity']:.4f} ({d['perplexity_pct']:+.2f}%), bits/byte "
          f"{base_metrics['bits_per_byte']:.4f} -> {new_metrics['bits_per_byte']:.4f}, "
          f"checkpoint {original_bytes} -> {ckpt_bytes} bytes; report in {out}")
    return record


def _original_metrics(out_root: str, run: LoadedRun, data_dir: str, kw: dict) -> dict:
    """The original model's validation metrics, computed once per out_dir, run, step and
    evaluation setting (every method's report compares against the same numbers)."""
    path = os.path.join(out_root, "original", "metrics.json")
    key = {"run_dir": run.run_dir, "step": run.step, **kw}
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["metrics"]
    metrics = validation_metrics(run, run.params, data_dir, **kw)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "metrics": metrics}, f, indent=2)
    return metrics


def _original_bytes(out_root: str, run: LoadedRun) -> int:
    """Bytes on disk of the float params saved the same way (written once per out_dir)."""
    path = os.path.join(out_root, "original", "checkpoint")
    record = os.path.join(path, "compress.json")
    if os.path.isfile(record):
        with open(record) as f:
            r = json.load(f)
        if r.get("source_run") == run.run_dir and r.get("step") == run.step:
            return directory_bytes(os.path.join(path, "params"))
    return save_compressed(path, run.params, method="original", source_run=run.run_dir,
                           step=run.step)


# ----------------------------------------------------------------------------- report

def report_markdown(r: dict) -> str:
    o, c, d = r["original"], r["compressed"], r["delta"]
    load = r["speed_conditions"]["load_average_1m"]
    rows = [
        ("validation bits/byte", f"{o['bits_per_byte']:.4f}", f"{c['bits_per_byte']:.4f}",
         f"{d['bits_per_byte']:+.4f}"),
        ("validation perplexity", f"{o['perplexity']:.4f}", f"{c['perplexity']:.4f}",
         f"{d['perplexity_pct']:+.2f}%"),
        ("checkpoint bytes (on disk)", f"{o['checkpoint_bytes']:,}", f"{c['checkpoint_bytes']:,}",
         f"x{d['size_ratio']:.3f}"),
        ("array bytes", f"{o['array_bytes']:,}", f"{c['array_bytes']:,}",
         f"x{c['array_bytes'] / o['array_bytes']:.3f}"),
        ("parameters", f"{o['params']:,}", f"{c['params']:,}", ""),
        ("non-zero parameters", f"{o['nonzero']:,}", f"{c['nonzero']:,}",
         f"{100 * (1 - c['nonzero'] / o['nonzero']):.1f}% zero"),
        ("prefill tokens/s", f"{o['prefill_tokens_per_s']:.0f}",
         f"{c['prefill_tokens_per_s']:.0f}", f"x{d['prefill_speedup']:.2f}"),
        ("decode tokens/s", f"{o['decode_tokens_per_s']:.1f}", f"{c['decode_tokens_per_s']:.1f}",
         f"x{d['decode_speedup']:.2f}"),
    ]
    lines = [f"# {r['name']}: {os.path.basename(r['run_dir'])} step {r['step']}", "",
             f"Settings: `{json.dumps(r['settings'])}`", "",
             "| | original | compressed | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c_} | {e} |" for a, b, c_, e in rows]
    sc = r["speed_conditions"]
    lines += ["", f"Validation: {r['eval']['batches']} batches of {r['eval']['batch_size']} x "
              f"{r['eval']['seq_len']} tokens. Speed: {sc['backend']}, batch 1, prefill "
              f"{sc['prefill_len']} tokens, greedy decode of {sc['decode_tokens']} tokens after "
              f"a 16-token prompt, best of {sc['repeats']} interleaved repeats, load average "
              f"{load[0]:.1f} -> {load[1]:.1f}. Quantized weights are dequantized inside the "
              "jitted forward, so their speed is the float model's plus the unpacking.", "",
              "Greedy sample of the compressed model after `def fibonacci(n):\\n`:", "",
              "```", r["sample"], "```", "", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def plot_all(out_root: str) -> None:
    """quality_vs_size.png and summary.md over every <out_root>/*/report.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = []
    for name in sorted(os.listdir(out_root)):
        path = os.path.join(out_root, name, "report.json")
        if os.path.isfile(path):
            with open(path) as f:
                reports.append(json.load(f))
    if not reports:
        return
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(9, 5))
    base = reports[0]["original"]
    ax.scatter([_size_bits(base, None) / 8 / 1e6], [base["bits_per_byte"]], c="black",
               marker="*", s=160, label="original (fp32)", zorder=3)
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(reports):  # one colour and legend entry per method; squares = pruned
        c = r["compressed"]
        pruned = r["method"] in prune.METHODS
        ax.scatter([_size_bits(c, r) / 8 / 1e6], [c["bits_per_byte"]], s=55,
                   color=colors[i % len(colors)], marker="s" if pruned else "o",
                   edgecolors="black", linewidths=0.4, zorder=2,
                   label=f"{r['name']} ({r['delta']['perplexity_pct']:+.1f}% ppl)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("model size, MB (quantized: codes + scales; pruned: non-zeros fp32 + 1-bit mask)")
    ax.set_ylabel("validation bits/byte")
    ax.set_title(f"quality vs size: {os.path.basename(reports[0]['run_dir'])}, "
                 f"{len(reports)} methods")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out_root, "quality_vs_size.png"), dpi=120)
    plt.close(fig)
    lines = ["| method | bits/byte | ppl | Δppl | checkpoint bytes | size | non-zeros | "
             "prefill x | decode x |", "|---|---|---|---|---|---|---|---|---|",
             f"| original | {base['bits_per_byte']:.4f} | {base['perplexity']:.4f} | | "
             f"{base['checkpoint_bytes']:,} | 1.000 | {base['nonzero']:,} | | |"]
    for r in reports:
        c, d = r["compressed"], r["delta"]
        lines.append(f"| {r['name']} | {c['bits_per_byte']:.4f} | {c['perplexity']:.4f} | "
                     f"{d['perplexity_pct']:+.2f}% | {c['checkpoint_bytes']:,} | "
                     f"{d['size_ratio']:.3f} | {c['nonzero']:,} | {d['prefill_speedup']:.2f} | "
                     f"{d['decode_speedup']:.2f} |")
    with open(os.path.join(out_root, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _size_bits(m: dict, r: dict | None) -> float:
    if r is not None and r["method"] in prune.METHODS:
        return m["nonzero"] * 32 + m["params"]
    return m["array_bytes"] * 8


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compress",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", default=None, help="the trained run to compress")
    parser.add_argument("--method", default=None,
                        help=f"one of {', '.join(METHODS)}, or several separated by commas "
                        "(one process, one report each)")
    parser.add_argument("--out_dir", default=None, help="default: run_dir")
    parser.add_argument("--speed_only", action="store_true",
                        help="re-time every report under <out_dir or run_dir>/compress in one "
                        "process (original and all compressed models interleaved)")
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_param", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        parse_gin(args.gin_file, args.gin_param)
        kwargs = {k: v for k, v in (("run_dir", args.run_dir), ("method", args.method),
                                    ("out_dir", args.out_dir)) if v is not None}
        with gin.config_scope(None):
            bound = gin.get_bindings("compress")
        if args.speed_only:
            root = args.out_dir or args.run_dir
            if not root:
                raise ConfigError("--speed_only needs --out_dir (or --run_dir).")
            remeasure_speed(os.path.join(os.path.abspath(root), "compress"),
                            gin.query_parameter("compress.speed_repeats")
                            if "speed_repeats" in gin.get_bindings("compress") else 5)
            return 0
        if "run_dir" not in kwargs and "run_dir" not in bound:
            raise ConfigError("no run to compress: pass --run_dir=runs/<name>.")
        if "method" not in kwargs and "method" not in bound:
            raise ConfigError(f"no method: pass --method=one of {', '.join(METHODS)}.")
        methods = kwargs.pop("method", None)
        for method in (methods.split(",") if methods else [None]):
            compress(**kwargs, **({"method": method} if method else {}))
    except (ConfigError, DataError) as e:
        print(f"compress: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
