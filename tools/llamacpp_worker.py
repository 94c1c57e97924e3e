"""Greedy decoding with llama.cpp (llama-cpp-python) on a GGUF file, driven over stdin/stdout.

Runs in whatever Python has `llama_cpp` installed (often a side virtualenv, since the package
builds llama.cpp from source), so it imports nothing from this repository:

    /tmp/llamacpp-venv/bin/python tools/llamacpp_worker.py MODEL.gguf [--threads=N] [--n_ctx=N]

It loads the model once, prints {"ready": true}, then answers one JSON line per request line
{"tokens": [ids...], "n": new_tokens} with {"tokens": [n greedy ids], "seconds": wall time of
the prompt evaluation plus the n tokens}, or {"tokens": [ids...], "logits": true} with the
teacher-forced {"logits": [[vocab floats] per position]} (start it with --kv_f32 for these).
EOS does not stop it (the benchmarks and the parity
test compare a fixed number of tokens). The client side, used by tools/bench_serve.py and the
tests: `llama_cpp_python()` finds an interpreter that has the package and `LlamaCpp` drives one
worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIDE_VENV = "/tmp/llamacpp-venv"  # where docs/serving.md builds llama-cpp-python from source


def llama_cpp_python() -> str | None:
    """A Python interpreter that can import llama_cpp: $LLAMA_CPP_PYTHON, else this one, else
    the side virtualenv's; None when there is none."""
    candidates = [os.environ.get("LLAMA_CPP_PYTHON"), sys.executable,
                  os.path.join(SIDE_VENV, "bin", "python")]
    for python in candidates:
        if python and os.path.exists(python) and subprocess.run(
                [python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return python
    return None


class LlamaCpp:
    """One llama.cpp worker process over a GGUF file: `generate(ids, n)` -> (n greedy ids,
    seconds for the prompt and the n tokens)."""

    def __init__(self, model: str, *, python: str, threads: int | None = None,
                 n_ctx: int = 512, kv_f32: bool = False):
        cmd = [python, os.path.abspath(__file__), model, f"--n_ctx={n_ctx}"]
        if threads:
            cmd.append(f"--threads={threads}")
        if kv_f32:
            cmd.append("--kv_f32")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"llama.cpp worker failed to load {model} (exit "
                               f"{self.proc.wait()})")
        self.threads = json.loads(ready)["threads"]

    def generate(self, tokens: list[int], n: int) -> tuple[list[int], float]:
        self.proc.stdin.write(json.dumps({"tokens": tokens, "n": n}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["tokens"], reply["seconds"]

    def logits(self, tokens: list[int]) -> list[list[float]]:
        """Teacher-forced logits [len(tokens), vocab] of one forward pass over `tokens`."""
        self.proc.stdin.write(json.dumps({"tokens": tokens, "logits": True}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["logits"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n_ctx", type=int, default=512)
    parser.add_argument("--kv_f32", action="store_true",
                        help="F32 KV cache (llama.cpp's default is F16) and all-position logits")
    args = parser.parse_args(argv)
    from llama_cpp import Llama

    extra = {"type_k": 0, "type_v": 0, "logits_all": True} if args.kv_f32 else {}  # 0: F32
    llm = Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False, seed=0, **extra)
    print(json.dumps({"ready": True, "threads": args.threads}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("logits"):
            llm.reset()
            llm.eval(request["tokens"])
            scores = llm.scores[:len(request["tokens"])]
            print(json.dumps({"logits": [[float(x) for x in row] for row in scores]}),
                  flush=True)
            continue
        out = []
        start = time.perf_counter()
        # top_k=1 with temperature 0: llama.cpp's greedy sampler; no repetition penalty.
        for token in llm.generate(request["tokens"], top_k=1, temp=0.0, repeat_penalty=1.0,
                                  reset=True):
            out.append(int(token))
            if len(out) == request["n"]:
                break
        seconds = time.perf_counter() - start
        print(json.dumps({"tokens": out, "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
