"""The chat template: how a list of chat messages becomes one prompt string, in one place.

Until an SFT stage defines its own, every chat model of this repo reads conversations as

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

Each message is its role tag on a line of its own, then the content, then a newline. The tags are
plain text (the tokenizer has no special tokens for them), so a completion is cut at the next tag
(`CHAT_STOP`). `CHAT_TEMPLATE_JINJA` is the same template in the Jinja syntax of Hugging Face
tokenizers and lm-eval (served at /tokenizer_info); `render_chat` is its reference implementation
(tested equal).
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("system", "user", "assistant")
CHAT_STOP = ("<|user|>", "<|system|>", "<|assistant|>")

CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """messages: [{"role": system|user|assistant, "content": str}, ...] -> the prompt text.
    ValueError for an unknown role or non-string content."""
    parts = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        parts.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
