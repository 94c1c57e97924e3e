"""Teacher-forced logits of a GGUF file in llama.cpp against the run it was exported from.

    python -m tools.gguf_parity --run_dir=runs/X --gguf=model.gguf --text=FILE [--tokens=200]

BOS + the first `--tokens` - 1 tokens of `--text` go through llama.cpp (llama-cpp-python in
whichever interpreter has it: $LLAMA_CPP_PYTHON, this one, or /tmp/llamacpp-venv; F32 KV cache)
and through `transformer.apply` on the run's checkpoint, one forward pass each. Prints JSON: the
max |logit difference| and top-1 agreement over all positions, and separately before and from
the run's RoPE original context (`ModelConfig.rope_original_max_len`) when it has one -- the
check that llama.cpp applies a scaled RoPE (YaRN keys, llama3/linear `rope_freqs`) as we do.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from llm.config import ConfigError
from llm.data.sources import DataError


def gguf_parity(run_dir: str, gguf_path: str, text: str, tokens: int = 200) -> dict:
    """{max_abs_logit_diff, top1_agreement, ...} of llama.cpp on `gguf_path` vs the run."""
    from llm.model import transformer
    from llm.runs import load_run
    from llm.serve.engine import BOS_ID
    from tools.llamacpp_worker import LlamaCpp, llama_cpp_python

    python = llama_cpp_python()
    if python is None:
        raise ConfigError("llama-cpp-python is not installed here, in $LLAMA_CPP_PYTHON or in "
                          "/tmp/llamacpp-venv; install the 'llamacpp' extra (docs/interop.md).")
    run = load_run(run_dir)
    ids = [BOS_ID, *run.tokenizer.encode(text)][:tokens]
    if len(ids) > run.seq_len:
        raise DataError(f"--tokens={tokens} exceeds the run's context {run.seq_len}.")
    ours = np.asarray(transformer.apply(run.graphdef, run.params, np.asarray([ids], np.int32)))[0]
    worker = LlamaCpp(gguf_path, python=python, threads=1, n_ctx=max(len(ids), 64), kv_f32=True)
    try:
        theirs = np.asarray(worker.logits(ids), np.float32)
    finally:
        worker.close()

    def stats(a: np.ndarray, b: np.ndarray) -> dict:
        return {"positions": len(a), "max_abs_logit_diff": float(np.abs(a - b).max()),
                "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}

    out = {"tokens": len(ids), "max_abs_logit": float(np.abs(ours).max()),
           "rope_scaling": run.cfg.rope_scaling, "all": stats(ours, theirs)}
    split = run.cfg.rope_original_max_len
    if split and 0 < split < len(ids):
        out["before_original_context"] = stats(ours[:split], theirs[:split])
        out["from_original_context"] = stats(ours[split:], theirs[split:])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gguf_parity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--text", required=True, help="a text file to teacher-force")
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        with open(args.text) as f:
            text = f.read()
    except OSError as e:
        print(f"gguf_parity: error: --text={args.text!r} cannot be read ({e.strerror}).",
              file=sys.stderr)
        return 2
    try:
        print(json.dumps(gguf_parity(args.run_dir, args.gguf, text, args.tokens), indent=1))
    except (ConfigError, DataError) as e:
        print(f"gguf_parity: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
