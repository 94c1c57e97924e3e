"""The default chat template: the Python renderer, its Jinja twin (served to lm-eval and HF-style
clients) and a hand-written expected prompt agree."""

from __future__ import annotations

import jinja2
import pytest

from llm.serve.chat_template import CHAT_TEMPLATE_JINJA, render_chat

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": ""}]


def test_python_and_jinja_templates_agree_with_the_documented_format():
    expected = ("<|system|>\nBe brief.\n<|user|>\nHi\nthere\n<|assistant|>\nHello.\n"
                "<|user|>\n\n<|assistant|>\n")
    assert render_chat(MESSAGES) == expected
    jinja = jinja2.Template(CHAT_TEMPLATE_JINJA)
    assert jinja.render(messages=MESSAGES, add_generation_prompt=True) == expected
    assert render_chat(MESSAGES, add_generation_prompt=False) == expected[:-len("<|assistant|>\n")]
    assert jinja.render(messages=MESSAGES, add_generation_prompt=False) == \
        render_chat(MESSAGES, add_generation_prompt=False)


def test_bad_messages_raise():
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        render_chat([{"role": "user", "content": 3}])
