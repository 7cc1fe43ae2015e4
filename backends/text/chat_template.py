"""Turns chat messages into the prompt text a model expects, using the Jinja chat template
stored in its GGUF file (as Hugging Face and llama.cpp do), in a sandbox.

A file without a template (a base model, such as the bundled Gemma 3 270M) gets plain
"User:/Assistant:" turns, which base models continue well, and stop strings that end the
reply where the model would start writing the user's next turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.text.tool_prompt import for_template, inline_tools, template_knows_tools

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """The messages are malformed or the model's template rejected them."""


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    stop: tuple[str, ...]


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def validate_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise ChatTemplateError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatTemplateError(f"message {i} needs a role out of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} needs text content")


def render_chat(
    messages: Sequence[dict[str, Any]],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[dict[str, Any]] = (),
) -> ChatPrompt:
    """The prompt for `messages`, ending where the assistant's reply should begin. `tools`
    (OpenAI's list) go to a template that knows tools, or into the messages otherwise
    (`backends.text.tool_prompt`)."""
    validate_messages(messages)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    extra: dict[str, Any] = {}
    try:
        if template_knows_tools(template):
            turns: list[dict[str, Any]] = for_template(messages)
            if tools:
                extra["tools"] = list(tools)
        else:
            turns = list(inline_tools(messages, list(tools)))
        text = env.from_string(template or FALLBACK_TEMPLATE).render(
            messages=turns,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=True,
            **extra,
        )
    except ChatTemplateError:
        raise
    except ValueError as exc:  # tool calls that are not JSON
        raise ChatTemplateError(f"bad tool calls in the messages: {exc}") from exc
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
    return ChatPrompt(text=text, stop=() if template else FALLBACK_STOPS)
