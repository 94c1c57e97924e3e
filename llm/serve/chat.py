"""Interactive terminal chat with a run's model, on this machine.

    python -m llm.serve.chat --run_dir=runs/X [--system="You are ..."] [--temperature=0.7]

Each turn is rendered with the repo's chat template (`llm.serve.chat_template.render_chat`) over
the whole conversation so far, and the reply streams as it is decoded (the serving `Engine`, one
slot; the reply ends at EOS, at the next role tag, or at --max_tokens). When the conversation
outgrows the model's context the oldest turns are dropped (the system message is kept).

Commands: /reset forgets the conversation (the system message stays), /quit (or Ctrl-D) exits.
"""

from __future__ import annotations

import argparse
import sys

from llm.serve.chat_template import CHAT_STOP, render_chat

PROMPT = "you> "
REPLY = "assistant> "


def fit_history(messages: list[dict], encode, budget: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest non-system turns until the rendered prompt has <= budget tokens.
    Returns (kept messages, prompt ids); ids are empty when even the last message alone is too
    long."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while turns:
        ids = encode(render_chat(system + turns))
        if len(ids) <= budget:
            return system + turns, ids
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]
    return system, []


def chat(engine, params, system: str | None, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """The read-reply loop over `stdin`/`stdout` (both line-oriented, flushed per token)."""
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    budget = engine.max_context - params.max_tokens
    while True:
        stdout.write(PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            stdout.write("\n")
            return
        text = line.rstrip("\n")
        if text.strip() == "/quit":
            return
        if text.strip() == "/reset":
            messages = list(base)
            stdout.write("(conversation reset)\n")
            continue
        if not text.strip():
            continue
        kept, ids = fit_history([*messages, {"role": "user", "content": text}],
                                engine.tokenizer.encode, budget)
        if not ids:
            stdout.write(f"(message too long: the context is {engine.max_context} tokens, "
                         f"{params.max_tokens} of them reserved for the reply)\n")
            continue
        stdout.write(REPLY)
        stdout.flush()
        req = engine.submit(ids, params)
        shown = 0
        while not req.finished:
            engine.step()
            if req.emitted > shown:
                stdout.write(req.text[shown:req.emitted])
                stdout.flush()
                shown = req.emitted
        stdout.write(req.text[shown:] + "\n")
        stdout.flush()
        messages = [*kept, {"role": "assistant", "content": req.text.strip()}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.serve.chat",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True,
                        help="a run directory or a compressed checkpoint (compress/<method>/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--max_tokens", type=int, default=256, help="most tokens per reply")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prog = "llm.serve.chat"

    from llm.config import ConfigError
    from llm.data.sources import DataError
    from llm.runs import load_run
    from llm.serve.engine import Engine, EngineConfig, SamplingParams

    try:
        run = load_run(args.run_dir, step=args.step)
        if not 1 <= args.max_tokens < run.seq_len:
            raise ValueError(f"--max_tokens={args.max_tokens} must be in [1, {run.seq_len}) "
                             f"(the run's context is {run.seq_len} tokens).")
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, stop=CHAT_STOP)
        params.validate()
        engine = Engine(run.graphdef, run.params, run.cfg, run.tokenizer, EngineConfig(
            slots=1, max_context=run.seq_len, chunk_size=min(256, 1 << (run.seq_len.bit_length()
                                                                          - 1)),
            min_chunk=16))
    except (ConfigError, DataError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{prog}: {run.name} (step {run.step}, context {run.seq_len} tokens). /reset clears "
          "the conversation, /quit exits.", flush=True)
    try:
        chat(engine, params, args.system)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
