"""The transcript widget: Markdown with raw HTML off, code blocks shaded, Copy links that work.

markdown.py writes the Markdown; this view renders it (Qt's own Markdown reader with HTML
spans and blocks disabled, so a reply's `<blockquote>` is shown as text and cannot hide what
follows it), shades fenced code, and answers a click on a code block's `copy:N` link by putting
that block's code on the clipboard. Other links open in the browser, never in the view.

While a reply streams only its own part is redrawn, and a new message is added after the
others: laying out a long conversation again each time would freeze the window for tens of
milliseconds.
"""

from __future__ import annotations

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import (
    QColor,
    QDesktopServices,
    QGuiApplication,
    QTextBlockFormat,
    QTextCursor,
    QTextDocument,
    QTextFormat,
)
from PySide6.QtWidgets import QTextBrowser, QWidget

from app.gui.transcript.markdown import COPY_SCHEME, SEPARATOR, RenderedTranscript

MARKDOWN = (QTextDocument.MarkdownFeature.MarkdownDialectGitHub
            | QTextDocument.MarkdownFeature.MarkdownNoHTML)
CODE_BACKGROUND = QColor("#f2f4f4")
OPENABLE = ("http", "https", "mailto")


def extends(old: str, new: str) -> bool:
    """Whether the messages in `new` are those in `old` (not none), maybe with more after."""
    return bool(old) and (new == old or new.startswith(old + SEPARATOR))


class TranscriptView(QTextBrowser):
    copied = Signal(str)  # the code a Copy link put on the clipboard

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("transcript")
        self.setOpenLinks(False)
        self.anchorClicked.connect(self._clicked)
        self.rendered = RenderedTranscript("")
        self._tail_at: int | None = None  # where the streaming reply starts in the document

    def show_transcript(self, rendered: RenderedTranscript) -> None:
        old = self.rendered.history
        if self._tail_at is None or not extends(old, rendered.history):
            self.document().setMarkdown(rendered.history, MARKDOWN)
            self._shade_code(0)
            self._tail_at = self.document().characterCount() - 1
        else:  # the same messages, maybe with new ones after them: only the end changes
            self._drop_tail()
            if rendered.history != old:
                self._append(rendered.history[len(old):])
                self._tail_at = self.document().characterCount() - 1
        if rendered.streaming is not None:
            self._append(SEPARATOR + rendered.streaming if rendered.history
                         else rendered.streaming)
        self.rendered = rendered

    def _drop_tail(self) -> None:
        assert self._tail_at is not None
        tail = QTextCursor(self.document())
        tail.setPosition(self._tail_at)
        tail.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        tail.removeSelectedText()

    def _append(self, markdown: str) -> None:
        """Markdown after the end of the document; one that starts with SEPARATOR starts
        in a block of its own (hence the newlines dropped: the end is a block already)."""
        end = QTextCursor(self.document())
        end.movePosition(QTextCursor.MoveOperation.End)
        start = end.position()
        end.insertMarkdown(markdown.lstrip("\n"), MARKDOWN)
        self._shade_code(start)

    def _shade_code(self, start: int) -> None:
        shade = QTextBlockFormat()
        shade.setBackground(CODE_BACKGROUND)
        cursor = QTextCursor(self.document())
        block = self.document().findBlock(start)
        while block.isValid():
            if block.blockFormat().hasProperty(QTextFormat.Property.BlockCodeFence):
                cursor.setPosition(block.position())
                cursor.mergeBlockFormat(shade)
            block = block.next()

    def copy_code(self, index: int) -> bool:
        code = self.rendered.code
        if not 0 <= index < len(code):
            return False
        QGuiApplication.clipboard().setText(code[index].code)
        self.copied.emit(code[index].code)
        return True

    def _clicked(self, url: QUrl) -> None:
        if url.scheme() == COPY_SCHEME:
            index = url.path()
            self.copy_code(int(index) if index.isdigit() else -1)
        elif url.scheme() in OPENABLE:
            QDesktopServices.openUrl(url)
