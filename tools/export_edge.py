"""Edge export of a run's decode step: serialized StableHLO (`jax.export`) and a LiteRT/TFLite
flatbuffer (jax2tf + the TF converter), each checked against the JAX model on a prompt.

    python -m tools.export_edge --run_dir=runs/quickstart --out=edge/quickstart [--cache_len=128]

The exported function is one decode step at batch 1 with the weights baked in as constants:

    decode_step(token [1] int32, length [1] int32, *cache) -> (logits [1, vocab] fp32, *cache)

`cache` is the KV cache of every layer, k then v ([1, cache_len, kv_heads, head_dim] fp32 each,
in `edge.json`'s order); `length` is the number of positions already cached, the token's
position. A caller prefills by stepping through the prompt, then decodes greedily or samples
from the logits on the host, carrying the returned cache into the next call.

Writes under --out: decode_step.stablehlo (jax.export's serialization; `jax.export.deserialize`
reads it back and `.call`s it on any backend), decode_step.tflite (TFLITE_BUILTINS only: no
select-TF ops, so the plain LiteRT runtime runs it), and edge.json (shapes, input order, parity).

Parity: the prompt's tokens, then `--new_tokens` greedy tokens, go through the jitted JAX step,
the deserialized StableHLO and the TFLite interpreter (LiteRT's `ai_edge_litert` when installed,
else TF's bundled `tf.lite.Interpreter`), each carrying its own cache; reported as the max
|logit - JAX logit| over all steps (tolerance `PARITY_ATOL`, fp32) and whether the greedy tokens
are identical. The TFLite path goes through jax2tf's graph (non-native) lowering, which jax marks
as deprecated: the native lowering wraps the whole program in one XlaCallModule op, which the TF
Lite converter cannot turn into TFLite builtins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

PARITY_ATOL = 1e-4


def decode_step_fn(run, cache_len: int, int8_lookup: bool = False):
    """(step, example args): step(token, length, *cache) as in the module docstring, for the
    run's weights, with batch 1 and `cache_len` cache rows (int8_lookup: see `_int8_lookup`)."""
    import jax
    from flax import nnx

    from llm.serve.sampler import init_caches

    cache_graphdef, cache_state = init_caches(run.cfg, 1, cache_len)
    leaves, treedef = jax.tree.flatten(cache_state)
    model = nnx.merge(run.graphdef, run.params)
    if int8_lookup:
        _int8_lookup(model)

    def step(token, length, *cache):
        caches = nnx.merge(cache_graphdef, jax.tree.unflatten(treedef, list(cache)))
        logits = model(token[:, None], positions=length[:, None], caches=list(caches),
                       cache_lengths=length)
        return (logits[:, 0], *jax.tree.leaves(nnx.state(caches)))

    args = (np.zeros((1,), np.int32), np.zeros((1,), np.int32),
            *[np.zeros(x.shape, x.dtype) for x in leaves])
    return step, args


def _int8_lookup(model) -> None:
    """Make `model`'s token-embedding lookup gather int8 rows and scale them (symmetric, one
    scale per vocabulary row: max |row| / 127, the converter's own per-channel scheme), in place.

    For the dynamic-range TFLite model: the converter quantizes the weights of matmuls
    (FULLY_CONNECTED, BATCH_MATMUL) but not of a gather, so a tied table, read by the lookup and
    by the output projection, would stay in the file once in fp32 (for the lookup) beside its
    int8 copy (for the logits). With the lookup on int8 rows, the fp32 table feeds only the
    output matmul, which the converter quantizes; the file holds no fp32 weight matrix."""
    import jax.numpy as jnp
    from flax import nnx

    from llm.model.layers import Embed

    class Int8LookupEmbed(Embed):
        def __call__(self, ids):
            rows = jnp.take(self.table_int8[...], ids, axis=0).astype(jnp.float32)
            return (rows * jnp.take(self.row_scale[...], ids, axis=0)[..., None]).astype(
                self.dtype)

    table = np.asarray(model.embed.embedding[...], np.float32)
    scale = np.maximum(np.abs(table).max(axis=1), 1e-12) / 127.0
    model.embed.__class__ = Int8LookupEmbed
    model.embed.table_int8 = nnx.Variable(jnp.asarray(np.round(table / scale[:, None])
                                                      .astype(np.int8)))
    model.embed.row_scale = nnx.Variable(jnp.asarray(scale.astype(np.float32)))


def prefill_fn(run, cache_len: int, prefill_len: int, int8_lookup: bool = False):
    """(prefill, example args): the prompt program, batch 1, for the run's weights:

        prefill(tokens [1, prefill_len] int32, start [1] int32, count [1] int32, *cache)
            -> (logits [1, vocab] fp32 of tokens[count - 1], *cache)

    writes the chunk's prefill_len positions start .. start + prefill_len - 1 into the cache in
    one call (a prompt longer than prefill_len goes in several chunks; a short last chunk is
    padded: count says how many tokens are real). The padded rows past start + count hold
    garbage that no later query attends to (the cached attention masks keys past each query's
    position) and the next decode step overwrites. The caller keeps start + prefill_len <=
    cache_len (XLA clamps an update that would run past the cache)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llm.serve.sampler import init_caches

    cache_graphdef, cache_state = init_caches(run.cfg, 1, cache_len)
    leaves, treedef = jax.tree.flatten(cache_state)
    model = nnx.merge(run.graphdef, run.params)
    if int8_lookup:
        _int8_lookup(model)

    def prefill(tokens, start, count, *cache):
        caches = nnx.merge(cache_graphdef, jax.tree.unflatten(treedef, list(cache)))
        positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        logits = model(tokens, positions=positions, caches=list(caches), cache_lengths=start)
        last = jnp.take_along_axis(logits, (count - 1)[:, None, None], axis=1)[:, 0]
        return (last, *jax.tree.leaves(nnx.state(caches)))

    args = (np.zeros((1, prefill_len), np.int32), np.zeros((1,), np.int32),
            np.ones((1,), np.int32), *[np.zeros(x.shape, x.dtype) for x in leaves])
    return prefill, args


def _tflite_interpreter(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interp = Interpreter(model_path=path)
    interp.allocate_tensors()
    return interp


def _to_tflite(fn, args, path: str, *, int8: bool) -> None:
    """jax2tf (graph lowering) + the TF Lite converter, TFLITE_BUILTINS only; int8: dynamic-range
    quantization (`Optimize.DEFAULT` with no representative data: weights int8 per channel,
    activations fp32, quantized on the fly inside the int8 kernels)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    f_tf = tf.function(jax2tf.convert(fn, native_serialization=False), autograph=False)
    concrete = f_tf.get_concrete_function(*[tf.TensorSpec(a.shape, a.dtype) for a in args])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], f_tf)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with open(path, "wb") as f:
        f.write(converter.convert())


def _tflite_runner(path: str):
    interp = _tflite_interpreter(path)
    ins = sorted(interp.get_input_details(), key=lambda d: d["index"])
    # Outputs come back in the converter's order: match them to ours by name order.
    outs = sorted(interp.get_output_details(), key=lambda d: int(d["name"].rsplit("_", 1)[-1])
                  if d["name"].rsplit("_", 1)[-1].isdigit() else d["index"])

    def run(*a):
        for d, x in zip(ins, a):
            interp.set_tensor(d["index"], np.asarray(x))
        interp.invoke()
        return [interp.get_tensor(d["index"]) for d in outs]

    return run, type(interp).__module__


def _teacher_forced(runners: dict, cache0: list, tokenizer, path: str, n: int,
                    cache_len: int) -> dict:
    """Every format's decode_step fed the first `n` tokens of the text file `path` (windows of
    cache_len tokens, each from an empty cache): the fraction of positions whose top-1 next
    token equals JAX's, and the max |logit - JAX logit|."""
    from llm.data.sources import DataError
    from llm.serve.engine import BOS_ID

    try:
        with open(path, encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())[:n]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--eval_text={path!r} cannot be read as UTF-8 text ({e}).") from None
    if not ids:
        raise DataError(f"--eval_text={path!r} has no tokens.")
    logits = {}
    for fmt, programs in runners.items():
        out = []
        for begin in range(0, len(ids), cache_len - 1):
            window, cache = [BOS_ID, *ids[begin:begin + cache_len - 1]], list(cache0)
            for pos, tok in enumerate(window):
                res = programs["decode_step"](np.array([tok], np.int32),
                                             np.array([pos], np.int32), *cache)
                cache = list(res[1:])
                out.append(res[0][0])
        logits[fmt] = np.stack(out)
    ref = logits["jax"]
    return {"text": path, "tokens": len(ids), **{
        fmt: {"top1_agreement_vs_jax": float(np.mean(x.argmax(-1) == ref.argmax(-1))),
              "max_abs_logit_diff_vs_jax": float(np.abs(x - ref).max())}
        for fmt, x in logits.items() if fmt != "jax"}}


def export_edge(run_dir: str, out_dir: str, *, cache_len: int = 128, step: int | None = None,
                prompt: str = "def fibonacci(n):\n", new_tokens: int = 16,
                prefill_len: int = 32, tflite: bool = True, eval_text: str | None = None,
                eval_tokens: int = 512) -> dict:
    """Write the exports (see the module docstring) and return edge.json's content."""
    import jax

    from llm.config import ConfigError
    from llm.runs import load_run
    from llm.serve.engine import BOS_ID

    run = load_run(run_dir, step=step)
    ids = [BOS_ID, *run.tokenizer.encode(prompt)]
    if len(ids) + new_tokens > cache_len:
        raise ConfigError(f"--cache_len={cache_len} is shorter than the parity check's "
                          f"{len(ids)} prompt + {new_tokens} new tokens; raise --cache_len.")
    if not 1 <= prefill_len <= cache_len:
        raise ConfigError(f"--prefill_len={prefill_len} must be between 1 and --cache_len="
                          f"{cache_len}.")
    if len(ids) > prefill_len:
        raise ConfigError(f"--prefill_len={prefill_len} is shorter than the parity prompt's "
                          f"{len(ids)} tokens; raise --prefill_len.")
    if run.cfg.position == "learned" and cache_len > run.cfg.max_seq_len:
        raise ConfigError(f"--cache_len={cache_len} exceeds the learned position table "
                          f"({run.cfg.max_seq_len}); lower --cache_len.")
    os.makedirs(out_dir, exist_ok=True)
    programs = {"decode_step": decode_step_fn(run, cache_len),
                "prefill": prefill_fn(run, cache_len, prefill_len)}
    programs_int8 = {"decode_step": decode_step_fn(run, cache_len, int8_lookup=True),
                     "prefill": prefill_fn(run, cache_len, prefill_len, int8_lookup=True)}
    runners: dict[str, dict] = {}  # format -> program -> callable
    meta = {"run_dir": run_dir, "step": run.step, "cache_len": cache_len,
            "prefill_len": prefill_len,
            "inputs": {"decode_step": ["token [1] int32", "length [1] int32", "*cache"],
                       "prefill": [f"tokens [1, {prefill_len}] int32", "start [1] int32",
                                   "count [1] int32", "*cache"],
                       "cache": [f"cache[{i}] {list(a.shape)} {a.dtype}"
                                 for i, a in enumerate(programs["decode_step"][1][2:])]},
            "outputs": ["logits [1, vocab] float32", "cache (same order as the inputs)"],
            "files": {}, "bytes": {}}
    for name, (fn, args) in programs.items():
        jitted = jax.jit(fn)
        exported = jax.export.export(jitted)(
            *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
        path = os.path.join(out_dir, f"{name}.stablehlo")
        with open(path, "wb") as f:
            f.write(exported.serialize())
        with open(path, "rb") as f:
            restored = jax.export.deserialize(bytearray(f.read()))
        runners.setdefault("jax", {})[name] = \
            lambda *a, j=jitted: [np.asarray(x) for x in j(*a)]
        runners.setdefault("stablehlo", {})[name] = \
            lambda *a, r=restored: [np.asarray(x) for x in r.call(*a)]
        meta["files"][f"stablehlo/{name}"] = os.path.basename(path)
        meta["stablehlo_platforms"] = list(exported.platforms)
        if tflite:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            for fmt, suffix in (("tflite", ""), ("tflite_int8", "_int8")):
                path = os.path.join(out_dir, f"{name}{suffix}.tflite")
                _to_tflite(*(programs_int8[name] if suffix else (fn, args)), path,
                           int8=bool(suffix))
                runners.setdefault(fmt, {})[name], meta["tflite_interpreter"] = \
                    _tflite_runner(path)
                meta["files"][f"{fmt}/{name}"] = os.path.basename(path)
    for key, name in meta["files"].items():
        meta["bytes"][key] = os.path.getsize(os.path.join(out_dir, name))
    cache0 = [np.array(a) for a in programs["decode_step"][1][2:]]

    def greedy(fmt: str, use_prefill: bool) -> tuple[list[int], np.ndarray]:
        """Prompt, then new_tokens greedy tokens, on `fmt`'s programs with its own cache:
        (new tokens, logits [steps, 1, vocab] of every prediction made)."""
        step, cache, seq, seen = runners[fmt]["decode_step"], list(cache0), list(ids), []
        pos = 0
        if use_prefill:
            tokens = np.zeros((1, prefill_len), np.int32)
            tokens[0, :len(ids)] = ids
            out = runners[fmt]["prefill"](tokens, np.array([0], np.int32),
                                          np.array([len(ids)], np.int32), *cache)
            seen.append(out[0])
            cache, pos = list(out[1:]), len(ids)
            seq.append(int(np.argmax(out[0][0])))
        while len(seq) < len(ids) + new_tokens:
            out = step(np.array([seq[pos]], np.int32), np.array([pos], np.int32), *cache)
            cache, pos = list(out[1:]), pos + 1
            if pos >= len(ids):
                seen.append(out[0])
                seq.append(int(np.argmax(out[0][0])))
        return seq[len(ids):], np.stack(seen)

    # Parity: every format steps through the prompt with decode_step (the "decode" flow), and
    # prefills it in one prefill call (the "prefill" flow), then decodes greedily; each is
    # compared with JAX's decode flow on the logits of the new tokens' predictions.
    ref_tokens, ref_logits = greedy("jax", use_prefill=False)
    meta["parity"], meta["parity_prefill"] = {}, {}
    for fmt in runners:
        for use_prefill, key in ((False, "parity"), (True, "parity_prefill")):
            if fmt == "jax" and not use_prefill:
                continue
            tokens, logits = greedy(fmt, use_prefill)
            agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b),
                         len(tokens))
            same_inputs = slice(0, min(agree + 1, len(tokens)))  # steps fed identical tokens
            meta[key][fmt] = {
                "max_abs_logit_diff_vs_jax": float(np.abs(logits - ref_logits).max()),
                "max_abs_logit_diff_same_inputs": float(
                    np.abs(logits[same_inputs] - ref_logits[same_inputs]).max()),
                "greedy_tokens_equal_jax": tokens == ref_tokens,
                "greedy_tokens_agreeing_before_first_difference": agree}
    meta["max_abs_logit_jax"] = float(np.abs(ref_logits).max())
    if eval_text is not None:
        meta["teacher_forced"] = _teacher_forced(runners, cache0, run.tokenizer, eval_text,
                                                 eval_tokens, cache_len)
    meta["parity_atol"] = PARITY_ATOL
    meta["parity_prompt_tokens"], meta["parity_new_tokens"] = len(ids), new_tokens
    with open(os.path.join(out_dir, "edge.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache_len", type=int, default=128)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prefill_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=16,
                        help="greedy tokens of the parity check")
    parser.add_argument("--no_tflite", action="store_true", help="StableHLO only")
    parser.add_argument("--eval_text", default=None,
                        help="a text file: also report teacher-forced top-1 agreement with JAX "
                             "over its first --eval_tokens tokens")
    parser.add_argument("--eval_tokens", type=int, default=512)
    args = parser.parse_args(argv)
    from llm.config import ConfigError
    from llm.data.sources import DataError

    try:
        meta = export_edge(args.run_dir, args.out, cache_len=args.cache_len, step=args.step,
                           prefill_len=args.prefill_len, new_tokens=args.new_tokens,
                           tflite=not args.no_tflite, eval_text=args.eval_text,
                           eval_tokens=args.eval_tokens)
    except (ConfigError, DataError) as e:
        print(f"export_edge: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("parity", "parity_prefill", "teacher_forced", "bytes")
                      if k in meta}, indent=1))
    bad = [f"{key}/{n}" for key in ("parity", "parity_prefill") for n, p in meta[key].items()
           if not n.endswith("int8") and p["max_abs_logit_diff_vs_jax"] > PARITY_ATOL]
    if bad:
        print(f"export_edge: parity above {PARITY_ATOL} for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
