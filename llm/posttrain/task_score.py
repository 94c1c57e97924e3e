"""Score a model on a task family (`llm.posttrain.tasks`) by greedy generation.

    score = task_score(graphdef, params, cfg, tokenizer, examples, chat=True)

chat=True prompts the way an SFT model is served: the task prompt is the user message of the chat
template (`render_chat`, generation prompt included) and the completion is cut at the first role
tag (`CHAT_STOP`) or EOS. chat=False continues the raw task prompt (how a pretrained model is
prompted), the completion cut at EOS. The completion is scored by the task's reward function
against the example's reference (`tasks.score`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm.data.tokenizer import Tokenizer
from llm.model.config import ModelConfig
from llm.posttrain import tasks
from llm.serve.chat_template import CHAT_STOP, render_chat
from llm.serve.sampler import generate


def prompt_ids(tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a task prompt, as a chat turn (chat=True) or raw text."""
    text = render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    return tokenizer.encode(text)


def cut_completion(text: str) -> str:
    """The completion up to the first chat role tag."""
    cuts = [i for i in (text.find(s) for s in CHAT_STOP) if i >= 0]
    return text[:min(cuts)] if cuts else text


def task_score(graphdef, params: dict, cfg: ModelConfig, tokenizer: Tokenizer,
               examples: Sequence[tasks.Example], *, chat: bool = True,
               max_new_tokens: int = 64, batch_size: int = 64, reward: str | None = None
               ) -> dict:
    """{"score": mean reward, "n": examples, "samples": the first 3 (prompt, completion)}.

    Greedy decoding; rows are generated `batch_size` at a time. reward: a reward name or
    "module:function" (default: the task's `tasks.default_reward`)."""
    if not examples:
        raise ValueError("task_score: no examples.")
    reward = reward or tasks.default_reward(examples[0].task)
    completions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids = [prompt_ids(tokenizer, e.prompt, chat) for e in chunk]
        new = generate(graphdef, params, cfg, ids, max_new_tokens=max_new_tokens,
                       temperature=0.0, top_k=0)
        completions += [cut_completion(tokenizer.decode(t)) for t in new]
    scores = tasks.score(reward, [e.prompt for e in examples], completions,
                         [e.reference for e in examples])
    return {"score": float(np.mean(scores)), "n": len(examples), "reward": reward,
            "samples": [{"prompt": e.prompt, "completion": c}
                        for e, c in zip(examples[:3], completions[:3])]}
