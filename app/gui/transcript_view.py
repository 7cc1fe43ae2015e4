"""The transcript widget: Markdown with raw HTML off, code blocks shaded, Copy links that work.

chat_markdown.py writes the Markdown; this view renders it (Qt's own Markdown reader with HTML
spans and blocks disabled, so a reply's `<blockquote>` is shown as text and cannot hide what
follows it), shades fenced code, and answers a click on a code block's `copy:N` link by putting
that block's code on the clipboard. Other links open in the browser, never in the view.
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

from app.gui.chat_markdown import COPY_SCHEME, RenderedTranscript

MARKDOWN = (QTextDocument.MarkdownFeature.MarkdownDialectGitHub
            | QTextDocument.MarkdownFeature.MarkdownNoHTML)
CODE_BACKGROUND = QColor("#f2f4f4")
OPENABLE = ("http", "https", "mailto")


class TranscriptView(QTextBrowser):
    copied = Signal(str)  # the code a Copy link put on the clipboard

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("transcript")
        self.setOpenLinks(False)
        self.anchorClicked.connect(self._clicked)
        self.rendered = RenderedTranscript("")

    def show_transcript(self, rendered: RenderedTranscript) -> None:
        self.rendered = rendered
        self.document().setMarkdown(rendered.markdown, MARKDOWN)
        self._shade_code()

    def _shade_code(self) -> None:
        shade = QTextBlockFormat()
        shade.setBackground(CODE_BACKGROUND)
        cursor = QTextCursor(self.document())
        block = self.document().begin()
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
