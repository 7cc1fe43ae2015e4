"""The chat transcript as Markdown that shows every character a model wrote.

Qt renders it with raw HTML off (see view.py), so `<blockquote>` in a reply is
text; this module makes the rest of the text safe for that renderer: a code fence a reply left
open is closed (or it would swallow the footer and every later message), an HTML entity such as
`&lt;` is kept as typed, and each fenced code block gets a header naming its language with a
`copy:N` link whose code is in `RenderedTranscript.code`. Qt-free, so it is tested on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from app.gui.conversations import Message
from app.gui.transcript.route_words import served_line

COPY_SCHEME = "copy"
SEPARATOR = "\n\n---\n\n"  # between messages
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
_CODE_SPAN = re.compile(r"(`+).+?\1")
_ENTITY = re.compile(r"&(?=#?[0-9A-Za-z]+;)")
_INLINE_SPECIAL = re.compile(r"([\\`*_\[\]<>&#|~])")


@dataclass(frozen=True)
class CodeBlock:
    language: str
    code: str


@dataclass
class RenderedTranscript:
    history: str  # the saved messages
    streaming: str | None = None  # the reply still arriving, drawn after them
    code: list[CodeBlock] = field(default_factory=list)  # `copy:N` copies code[N]

    @property
    def markdown(self) -> str:
        if self.streaming is None:
            return self.history
        return self.history + SEPARATOR + self.streaming if self.history else self.streaming


def escape_inline(text: str) -> str:
    """`text` as Markdown that shows literally (node messages, machine names)."""
    return _INLINE_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _keep_entities(line: str) -> str:
    """Escape `&` before entity-like text outside code spans, so `&lt;` shows as typed."""
    out, last = [], 0
    for span in _CODE_SPAN.finditer(line):
        out.append(_ENTITY.sub(r"\\&", line[last:span.start()]))
        out.append(span.group(0))
        last = span.end()
    out.append(_ENTITY.sub(r"\\&", line[last:]))
    return "".join(out)


def message_markdown(content: str, code: list[CodeBlock]) -> str:
    """One message's text made safe to render; its fenced code blocks are appended to
    `code`, each preceded by a 'language · Copy' line linking to `copy:N`."""
    out: list[str] = []
    fence: tuple[str, str, int] | None = None  # (indent, fence, index into out)
    lines: list[str] = []
    for line in content.split("\n"):
        match = _FENCE.match(line)
        if fence is None:
            if match and not (match.group(2)[0] == "`" and "`" in match.group(3)):
                indent, marks, info = match.groups()
                language = info.strip().split(" ")[0] if info.strip() else ""
                label = escape_inline(language or "code")
                out += ["", f"{indent}{label} · [Copy]({COPY_SCHEME}:{len(code)})", line]
                code.append(CodeBlock(language, ""))
                fence, lines = (indent, marks, len(code) - 1), []
            else:
                out.append(_keep_entities(line))
            continue
        indent, marks, index = fence
        if match and match.group(2).startswith(marks) and match.group(2)[0] == marks[0] \
                and not match.group(3).strip():
            code[index] = CodeBlock(code[index].language, "\n".join(lines))
            fence = None
        else:
            lines.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
        out.append(line)
    if fence is not None:  # still streaming, or cut off by max_tokens
        indent, marks, index = fence
        code[index] = CodeBlock(code[index].language, "\n".join(lines))
        out.append(indent + marks)
    return "\n".join(out)


def render_transcript(messages: list[Message], streaming: str | None = None
                      ) -> RenderedTranscript:
    """The conversation as Markdown; `streaming` is the reply still arriving."""
    rendered = RenderedTranscript("")
    blocks = []
    for m in messages:
        if m.role == "system":
            continue
        who = "You" if m.role == "user" else "Covey"
        block = f"**{who}**\n\n{message_markdown(m.content, rendered.code)}"
        if m.meta.get("notice"):
            block += f"\n\n> ⚠ {escape_inline(m.meta['notice'])}"
        if m.meta.get("error"):
            block += f"\n\n> ✖ {escape_inline(m.meta['error'])}"
        line = served_line(m.meta) if m.role == "assistant" else ""
        if line:
            block += f"\n\n*{escape_inline(line)}*"
        blocks.append(block)
    rendered.history = SEPARATOR.join(blocks)
    if streaming is not None:
        rendered.streaming = f"**Covey**\n\n{message_markdown(streaming, rendered.code) or '…'}"
    return rendered


def transcript_markdown(messages: list[Message], streaming: str | None = None) -> str:
    return render_transcript(messages, streaming).markdown
