"""The chat template: how a list of chat messages becomes one prompt string, in one place.

Serving (`llm.serve`) and supervised fine-tuning (`llm.posttrain.chat_data`) both use it, so a
model is prompted exactly the way it was fine-tuned. Every chat model of this repo reads
conversations as

    <|system|>
    You are a helpful assistant.
    <|user|>
    Hello!
    <|assistant|>
    Hi.
    <|user|>
    ...
    <|assistant|>
              <- the model continues here (add_generation_prompt=True)

Each message is its role tag on a line of its own, then the content, then a newline. The role
tags (`ROLE_TAGS`) are special tokens of the vocabulary: SentencePiece user-defined pieces,
reserved when a tokenizer is trained with `gin_configs/data/chat_tokens.gin`, or appended to an
existing run's vocabulary by SFT (`llm.posttrain.init.extend_tokenizer`), so a tag is always one
token and no text can be split into it. With a tokenizer that lacks them they are plain text,
which still renders the same string. Either way a completion is cut at the next tag
(`CHAT_STOP`); SFT teaches the model to emit it (or EOS) after its turn.

`CHAT_TEMPLATE_JINJA` is the same template in the Jinja syntax of Hugging Face tokenizers and
lm-eval (served at /tokenizer_info); `render_chat` is its reference implementation
(tested equal).
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("system", "user", "assistant")
ROLE_TAGS = tuple(f"<|{role}|>" for role in ROLES)  # the special tokens, in vocabulary order
CHAT_STOP = ("<|user|>", "<|system|>", "<|assistant|>")

CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def check_message(i: int, m: object) -> tuple[str, str]:
    """(role, content) of `messages[i]`; ValueError for an unknown role or non-string content."""
    if not isinstance(m, dict):
        raise ValueError(f"messages[{i}] must be an object with role and content, got "
                         f"{type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string")
    return role, content


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """messages: [{"role": system|user|assistant, "content": str}, ...] -> the prompt text.
    ValueError for an unknown role or non-string content."""
    parts = []
    for i, m in enumerate(messages):
        role, content = check_message(i, m)
        parts.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
