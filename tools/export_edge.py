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


def decode_step_fn(run, cache_len: int):
    """(step, example args): step(token, length, *cache) as in the module docstring, for the
    run's weights, with batch 1 and `cache_len` cache rows."""
    import jax
    from flax import nnx

    from llm.serve.sampler import init_caches

    cache_graphdef, cache_state = init_caches(run.cfg, 1, cache_len)
    leaves, treedef = jax.tree.flatten(cache_state)
    model = nnx.merge(run.graphdef, run.params)

    def step(token, length, *cache):
        caches = nnx.merge(cache_graphdef, jax.tree.unflatten(treedef, list(cache)))
        logits = model(token[:, None], positions=length[:, None], caches=list(caches),
                       cache_lengths=length)
        return (logits[:, 0], *jax.tree.leaves(nnx.state(caches)))

    args = (np.zeros((1,), np.int32), np.zeros((1,), np.int32),
            *[np.zeros(x.shape, x.dtype) for x in leaves])
    return step, args


def _tflite_interpreter(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interp = Interpreter(model_path=path)
    interp.allocate_tensors()
    return interp


def export_edge(run_dir: str, out_dir: str, *, cache_len: int = 128, step: int | None = None,
                prompt: str = "def fibonacci(n):\n", new_tokens: int = 16,
                tflite: bool = True) -> dict:
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
    if run.cfg.position == "learned" and cache_len > run.cfg.max_seq_len:
        raise ConfigError(f"--cache_len={cache_len} exceeds the learned position table "
                          f"({run.cfg.max_seq_len}); lower --cache_len.")
    os.makedirs(out_dir, exist_ok=True)
    fn, args = decode_step_fn(run, cache_len)
    jitted = jax.jit(fn)
    exported = jax.export.export(jitted)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
    hlo_path = os.path.join(out_dir, "decode_step.stablehlo")
    with open(hlo_path, "wb") as f:
        f.write(exported.serialize())
    with open(hlo_path, "rb") as f:
        restored = jax.export.deserialize(bytearray(f.read()))
    runners = {"jax": lambda *a: [np.asarray(x) for x in jitted(*a)],
               "stablehlo": lambda *a: [np.asarray(x) for x in restored.call(*a)]}
    meta = {"run_dir": run_dir, "step": run.step, "cache_len": cache_len,
            "inputs": ["token [1] int32", "length [1] int32"] + [
                f"cache[{i}] {list(a.shape)} {a.dtype}" for i, a in enumerate(args[2:])],
            "outputs": ["logits [1, vocab] float32", "cache (same order as the inputs)"],
            "stablehlo": os.path.basename(hlo_path),
            "stablehlo_platforms": list(exported.platforms)}
    if tflite:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        from jax.experimental import jax2tf

        f_tf = tf.function(jax2tf.convert(fn, native_serialization=False), autograph=False)
        concrete = f_tf.get_concrete_function(*[tf.TensorSpec(a.shape, a.dtype) for a in args])
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], f_tf)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        tfl_path = os.path.join(out_dir, "decode_step.tflite")
        with open(tfl_path, "wb") as f:
            f.write(converter.convert())
        interp = _tflite_interpreter(tfl_path)
        ins = sorted(interp.get_input_details(), key=lambda d: d["index"])
        outs = interp.get_output_details()
        # Outputs come back in the converter's order: match them to ours by name order.
        outs = sorted(outs, key=lambda d: int(d["name"].rsplit("_", 1)[-1])
                      if d["name"].rsplit("_", 1)[-1].isdigit() else d["index"])

        def run_tflite(*a):
            for d, x in zip(ins, a):
                interp.set_tensor(d["index"], np.asarray(x))
            interp.invoke()
            return [interp.get_tensor(d["index"]) for d in outs]

        runners["tflite"] = run_tflite
        meta["tflite"] = os.path.basename(tfl_path)
        meta["tflite_interpreter"] = type(interp).__module__
    # Parity: every runner steps through the prompt, then greedy tokens, on its own cache.
    diffs, tokens = {}, {}
    for name, runner in runners.items():
        cache = [np.array(a) for a in args[2:]]
        seq, logits_seen = list(ids), []
        for pos in range(len(ids) + new_tokens - 1):
            out = runner(np.array([seq[pos]], np.int32), np.array([pos], np.int32), *cache)
            logits, cache = out[0], list(out[1:])
            logits_seen.append(logits)
            if pos >= len(ids) - 1:
                seq.append(int(np.argmax(logits[0])))
        tokens[name] = seq[len(ids):]
        diffs[name] = np.stack(logits_seen)
    meta["parity"] = {
        name: {"max_abs_logit_diff_vs_jax": float(np.abs(diffs[name] - diffs["jax"]).max()),
               "greedy_tokens_equal_jax": tokens[name] == tokens["jax"]}
        for name in runners if name != "jax"}
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
    parser.add_argument("--no_tflite", action="store_true", help="StableHLO only")
    args = parser.parse_args(argv)
    from llm.config import ConfigError
    from llm.data.sources import DataError

    try:
        meta = export_edge(args.run_dir, args.out, cache_len=args.cache_len, step=args.step,
                           tflite=not args.no_tflite)
    except (ConfigError, DataError) as e:
        print(f"export_edge: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta["parity"], indent=1))
    bad = [n for n, p in meta["parity"].items() if p["max_abs_logit_diff_vs_jax"] > PARITY_ATOL]
    if bad:
        print(f"export_edge: parity above {PARITY_ATOL} for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
