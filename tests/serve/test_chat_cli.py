"""`python -m llm.serve.chat` driven through a real terminal (tmux), as a person uses it.

The replies are checked against an independent decoder: `llm.serve.sampler.generate` (the
fori_loop sampler, not the serving engine the CLI uses), greedy, on the chat template's rendering
of the conversation the CLI should have sent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.serve.chat_template import CHAT_STOP, render_chat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_TOKENS = 12

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def _expected_reply(run, messages: list[dict]) -> str:
    from llm.serve.sampler import generate

    ids = run.tokenizer.encode(render_chat(messages))
    out = generate(run.graphdef, run.params, run.cfg, [[0, *ids]],  # the engine's BOS is PAD
                   max_new_tokens=MAX_TOKENS, temperature=0.0, eos_id=1)[0]
    text = run.tokenizer.decode(out)
    cut = min([i for i in (text.find(s) for s in CHAT_STOP) if i >= 0], default=len(text))
    return text[:cut]


def _wait(log: Path, predicate, what: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_bytes().decode(errors="replace").replace("\r\n", "\n") \
            if log.exists() else ""
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; terminal so far:\n{text[-3000:]}")


@pytest.fixture(scope="module")
def random_run(tiny_run, tmp_path_factory) -> str:
    """A run directory (through `llm.interop.hf.import_hf`) holding a randomly initialised
    LLaMA-style model with wide weights: unlike the 12-step tiny run, whose replies are one
    repeated piece, its greedy replies depend on the whole conversation, so /reset shows."""
    import jax
    from safetensors.numpy import save_file

    from llm.interop import hf
    from llm.model import transformer
    from llm.model.config import ModelConfig
    from llm.runs import load_run

    tok = load_run(tiny_run).tokenizer
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, mlp_dim=128, max_seq_len=256, init_std=0.3)
    _, params = transformer.init(cfg, jax.random.key(0))
    src = tmp_path_factory.mktemp("hf_random")
    save_file(hf.to_hf_state(cfg, params), str(src / "model.safetensors"))
    (src / "config.json").write_text(__import__("json").dumps(hf.hf_config(cfg)))
    shutil.copyfile(tok.model_path, src / "tokenizer.model")
    run_dir = str(tmp_path_factory.mktemp("random_run") / "run")
    return hf.import_hf(str(src), run_dir, seq_len=256)


def test_chat_in_a_terminal(random_run, tmp_path):
    from llm.runs import load_run


    session = f"chat-test-{os.getpid()}"
    log = tmp_path / "terminal.log"

    def tmux(*args):
        subprocess.run(["tmux", *args], check=True, capture_output=True, timeout=30)

    tmux("new-session", "-d", "-s", session, "-x", "250", "-y", "50", "bash --norc")
    try:
        tmux("pipe-pane", "-t", session, "-o", f"cat >> {log}")
        tmux("send-keys", "-t", session,
             f"cd {REPO} && PYTHONPATH={REPO} {sys.executable} -m llm.serve.chat "
             f"--run_dir={random_run} --temperature=0 --max_tokens={MAX_TOKENS}", "Enter")
        _wait(log, lambda t: t.count("you> ") >= 1, "the first prompt", timeout=180)

        def say(text: str, prompts: int) -> str:
            tmux("send-keys", "-t", session, "-l", text)
            tmux("send-keys", "-t", session, "Enter")
            return _wait(log, lambda t: t.count("you> ") >= prompts, f"the reply to {text!r}")

        say("def parse(header):", 2)
        say("again", 3)
        say("/reset", 4)
        screen = say("again", 5)
        tmux("send-keys", "-t", session, "/quit", "Enter")
        _wait(log, lambda t: "/quit" in t.rsplit("you> ", 1)[-1]
              and t.rstrip().endswith(("#", "$")), "the shell prompt after /quit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

    replies = [part.split("\nyou> ", 1)[0] for part in screen.split("assistant> ")[1:]]
    assert len(replies) == 3, screen
    assert "(conversation reset)" in screen
    run = load_run(random_run)
    first = [{"role": "user", "content": "def parse(header):"}]
    r1 = _expected_reply(run, first)
    r2 = _expected_reply(run, [*first, {"role": "assistant", "content": r1.strip()},
                               {"role": "user", "content": "again"}])
    r3 = _expected_reply(run, [{"role": "user", "content": "again"}])  # after /reset
    assert r1.strip() and r3.strip() and r2 != r3  # the history reached the model
    # A terminal shows tabs as spaces only on capture; the raw stream keeps them.
    assert replies == [r1, r2, r3]
