"""The chat page with real widgets offscreen and a stand-in for the node's streamed replies:
the keys, Markdown that hides nothing, code blocks with Copy, the footer's words for every
route reason, search, export, edit and resend, and the "Starting Covey…" state."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QGuiApplication, QTextCursor
from PySide6.QtWidgets import QApplication, QInputDialog

from app.common.chat_request import ChatPanel
from app.gui.controller import Controller
from app.gui.conversations import Message
from app.gui.main_window import MainWindow
from app.gui.node_supervisor import NodeState
from app.gui.pages.chat import NO_MODEL_NOTICE, STARTING, STARTING_NOTICE, ChatPage
from app.gui.transcript.export import from_json
from app.gui.transcript.markdown import render_transcript
from app.gui.transcript.route_words import model_choices, served_line
from app.gui.transcript.view import CODE_BACKGROUND
from swarm.routes.auto import RouteFacts, RoutePrefs, decide
from tests.gui.conftest import until

MIB, GIB = 1 << 20, 1 << 30
TINY = {"id": "tiny", "covey": {"routes": ["local"], "machines": ["desk"], "auto": {
    "route": "local", "reason": "fits this machine (needs 35.0 MiB, 3.0 GiB free here)"}}}
SERVED = {"route": "local", "route_reason": TINY["covey"]["auto"]["reason"],  # type: ignore
          "machines": ["desk"]}


class FakeNode:
    """Answers `Controller.chat` as the node's stream would, and keeps what it was asked."""

    def __init__(self, reply: str = "Paris is the capital.", delay: float = 0.0) -> None:
        self.reply, self.delay = reply, delay
        self.asked: list[list[dict[str, str]]] = []

    async def chat(self, model: str, history: list[dict[str, str]],
                   *_args: Any, **_kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.asked.append(history)
        yield {"covey": SERVED}
        for word in self.reply.split(" "):
            await asyncio.sleep(self.delay)
            yield {"choices": [{"delta": {"content": word + " "}}]}
        yield {"choices": [{"delta": {}, "finish_reason": "stop"}],
               "usage": {"completion_tokens": 6}}


@contextlib.contextmanager
def main_window(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                node: FakeNode | None = None, ready: bool = True) -> Iterator[MainWindow]:
    controller = Controller(data_dir)
    monkeypatch.setattr(controller, "chat", (node or FakeNode()).chat)
    window = MainWindow(controller)
    if ready:
        controller.node_state.emit(NodeState("running"))
        controller.models.emit({"runnable": [TINY]})
    try:
        yield window
    finally:
        window.force_quit = True
        window.close()
        controller.conversations.close()


def shown(window: MainWindow, qtbot: Any) -> None:
    window.show()
    window.activateWindow()
    qtbot.waitExposed(window)
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=3000)


def pick(chat: ChatPage, conversation_id: int) -> None:
    """Click a conversation in the sidebar."""
    chat._reload_sidebar()
    chat.sidebar.setCurrentRow(-1)  # a click on the open one reads it again too
    rows = [chat.sidebar.item(i) for i in range(chat.sidebar.count())]
    chat.sidebar.setCurrentItem(next(
        item for item in rows if item.data(Qt.ItemDataRole.UserRole) == conversation_id))
    assert chat.conversation_id == conversation_id


async def replied(chat: ChatPage) -> None:
    await until(lambda: chat._reply is None, 10, "the reply to finish")


def test_enter_sends_and_shift_enter_adds_a_line(run_async, qtbot, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    node = FakeNode()

    async def body() -> None:
        with main_window(tmp_path, monkeypatch, node) as window:
            shown(window, qtbot)
            chat = window.chat
            assert QApplication.focusWidget() is chat.input  # ready to type on open
            qtbot.keyClicks(chat.input, "first line")
            qtbot.keyClick(chat.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
            qtbot.keyClicks(chat.input, "second line")
            assert chat.input.toPlainText() == "first line\nsecond line"
            assert chat.store.list() == []  # Shift+Enter sent nothing
            qtbot.keyClick(chat.input, Qt.Key.Key_Return)
            await replied(chat)
            messages = chat.store.messages(chat.conversation_id)
            assert [(m.role, m.content.strip()) for m in messages] == [
                ("user", "first line\nsecond line"), ("assistant", "Paris is the capital.")]
            assert node.asked[0][-1]["content"] == "first line\nsecond line"
            assert chat.input.toPlainText() == ""
            qtbot.keyClicks(chat.input, "no tabs")
            qtbot.keyClick(chat.input, Qt.Key.Key_Tab)
            assert chat.input.toPlainText() == "no tabs"  # Tab moved on instead
            assert QApplication.focusWidget() is not chat.input

    run_async(body())


def test_shortcuts_switch_pages_start_rename_and_stop(run_async, qtbot, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        with main_window(tmp_path, monkeypatch, FakeNode("word " * 200, 0.01)) as window:
            shown(window, qtbot)
            chat = window.chat
            qtbot.keyClick(window, Qt.Key.Key_3, Qt.KeyboardModifier.ControlModifier)
            assert window.stack.currentWidget() is window.models
            qtbot.keyClick(window, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)
            assert window.stack.currentWidget() is chat
            assert QApplication.focusWidget() is chat.input
            qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
            assert len(chat.store.list()) == 1 and chat.conversation_id is not None
            monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: ("Trip plans", True))
            qtbot.keyClick(window, Qt.Key.Key_F2)
            assert chat.sidebar.item(0).text() == "Trip plans"

            qtbot.keyClicks(chat.input, "Tell me a long story")
            qtbot.keyClick(chat.input, Qt.Key.Key_Return)
            await until(lambda: chat.stop_button.isEnabled() and chat._partial, 5, "the reply")
            qtbot.keyClick(chat.input, Qt.Key.Key_Escape)
            await replied(chat)
            reply = chat.store.messages(chat.conversation_id)[-1]
            assert reply.meta["stopped"] and len(reply.content) < len("word " * 200)

    run_async(body())


HTML_REPLY = [
    "Here is the markup you asked about:",
    "<blockquote><code>rm -rf build</code></blockquote>",
    '<div style="display:none">hidden text</div> <span hidden>more</span>',
    "<script>alert(1)</script> <!-- a comment --> <img src=x onerror=alert(2)>",
    "<table><tr><td>cell</td></tr></table> <style>p { color: red }</style>",
    "Entities stay as typed: &lt;p&gt; &amp; &#169; &copy;",
    "Unclosed <b>bold <i>and <a href='http://example.invalid'>link",
]


def test_an_html_reply_shows_every_character_and_its_footer(
        run_async, qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply's raw HTML is text, in a live reply and in history read from conversations.db;
    nothing after it (the footer, the next message) is lost."""
    reply = "\n\n".join(HTML_REPLY)
    footer = served_line({**SERVED, "tokens_per_s": 21.5})

    async def body() -> None:
        with main_window(tmp_path, monkeypatch, FakeNode(reply)) as window:
            chat = window.chat
            chat.input.setPlainText("Show me some <b>HTML</b>")
            chat.send()
            await replied(chat)
            text = chat.transcript.toPlainText()
            for part in HTML_REPLY:
                assert part in text
            assert "Show me some <b>HTML</b>" in text and "Ran on this machine" in text
        with main_window(tmp_path, monkeypatch) as window:  # the app opened again
            store = window.chat.store
            conv = store.list()[0]
            store.update(store.messages(conv.id)[-1].id, reply, {**SERVED, "tokens_per_s": 21.5})
            store.add(conv.id, "user", "And after it?")
            pick(window.chat, conv.id)
            text = window.chat.transcript.toPlainText()
            for part in HTML_REPLY:
                assert part in text
            assert footer in text and text.rstrip().endswith("And after it?")

    run_async(body())


CODE_REPLY = """Two ways:

```python
def greet(name):
    return f"<b>{name}</b> & co"
```

and, in a list:

1. Run this:

   ```
   make && ./run <args>
   ```

2. Then this (cut off by max_tokens):

```sh
echo unfinished"""


def test_code_blocks_are_shaded_labelled_and_copied(qtbot, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with main_window(tmp_path, monkeypatch) as window:
        chat = window.chat
        conv = chat.store.create("tiny")
        chat.store.add(conv.id, "user", "How?")
        chat.store.add(conv.id, "assistant", CODE_REPLY, SERVED)
        chat.store.add(conv.id, "user", "Thanks")
        window.resize(1000, 2000)
        window.show()
        qtbot.waitExposed(window)
        pick(chat, conv.id)
        view = chat.transcript
        text = view.toPlainText()
        assert "python · Copy" in text and "code · Copy" in text and "sh · Copy" in text
        assert "Ran on this machine" in text and text.rstrip().endswith("Thanks")
        assert [c.code for c in view.rendered.code] == [
            'def greet(name):\n    return f"<b>{name}</b> & co"', "make && ./run <args>",
            "echo unfinished"]

        shaded, plain = [], []
        block = view.document().begin()
        while block.isValid():
            colour = block.blockFormat().background().color()
            (shaded if colour == CODE_BACKGROUND else plain).append(block.text())
            block = block.next()
        assert shaded == ["def greet(name):", '    return f"<b>{name}</b> & co"',
                          "make && ./run <args>", "echo unfinished"]

        def click_copy(n: int) -> None:
            cursor = QTextCursor(view.document())
            for _ in range(n + 1):
                cursor = view.document().find("Copy", cursor)
            cursor.setPosition(cursor.selectionStart() + 2)
            view.setTextCursor(cursor)
            view.ensureCursorVisible()
            point: QPoint = view.cursorRect(cursor).center()
            qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=point)

        QGuiApplication.clipboard().clear()
        click_copy(1)
        assert QGuiApplication.clipboard().text() == "make && ./run <args>"
        assert chat.notice.text() == "Code copied."
        click_copy(0)
        assert QGuiApplication.clipboard().text().startswith("def greet(name):\n")


def _facts(**changes: Any) -> RouteFacts:
    base: dict[str, Any] = {"model": "m", "here": True, "need_bytes": 35 * MIB,
                            "free_bytes": 3 * GIB}
    return RouteFacts(**{**base, **changes})


BIG = {"need_bytes": 8 * GIB}
ROUTE_CASES = [  # (what the node decided, with what, the words the footer must say)
    ("auto", _facts(), RoutePrefs(),
     "Ran on this machine (desk), because it fits in this machine's free memory (needs 35.0 "
     "MiB; 3.0 GiB free)"),
    ("auto", _facts(queue_full=True, sharded=("w1",)), RoutePrefs(),
     "Ran split across w1, because this machine was busy with other replies"),
    ("auto", _facts(queue_full=True), RoutePrefs(),
     "Ran on this machine (desk), because it fits here, but this machine was busy"),
    ("auto", _facts(**BIG, sharded=("w1",)), RoutePrefs(remote_prompts=False),
     "Ran on this machine (desk), because it is too big for the free memory here, and "
     "sending prompts to other machines is off (needs 8.0 GiB; 3.0 GiB free)"),
    ("auto", _facts(**BIG, federated=("f1",)), RoutePrefs(),
     "Ran on f1, because it is too big for the free memory here (needs 8.0 GiB; 3.0 GiB "
     "free)"),
    ("auto", _facts(here=False, federated=("f1",)), RoutePrefs(),
     "Ran on f1, because this machine does not have the model"),
    ("auto", _facts(**BIG, sharded=("w1", "w2")), RoutePrefs(),
     "Ran split across w1, w2, because it is too big for this machine's free memory alone "
     "(needs 8.0 GiB; 3.0 GiB free)"),
    ("auto", _facts(**BIG), RoutePrefs(),
     "Ran on this machine (desk), because it is too big for the free memory here, and no "
     "other machine could take it"),
    ("local", _facts(sharded=("w1",)), RoutePrefs(),
     "Ran on this machine (desk), because this chat asks for this machine"),
    ("sharded", _facts(sharded=("w1",)), RoutePrefs(),
     "Ran split across w1, because this chat asks for the swarm, split across machines"),
    ("federated", _facts(federated=("f1",)), RoutePrefs(),
     "Ran on f1, because this chat asks for another machine in the swarm"),
    ("auto", _facts(sharded=("w1",)), RoutePrefs(prefer="sharded"),
     "Ran split across w1, because Covey's settings prefer this route"),
]
MEANINGS = {"local": "local route: the whole model ran here",
            "sharded": "sharded route: each machine holds some of the model's layers",
            "federated": "federated route: another machine in the swarm ran all of it"}


@pytest.mark.parametrize("requested,facts,prefs,words", ROUTE_CASES)
def test_the_footer_says_where_and_why_for_every_route_reason(
        requested: str, facts: RouteFacts, prefs: RoutePrefs, words: str) -> None:
    """Each reason swarm/routes/auto.py gives, as the footer words it; the picker, shown the
    same decision, gives the same reason."""
    choice = decide(requested, facts, prefs)
    machines = {"local": ["desk"], "federated": list(facts.federated),
                "sharded": list(facts.sharded)}[choice.route]
    footer = served_line({"route": choice.route, "route_reason": choice.reason,
                          "machines": machines, "tokens_per_s": 9.87})
    assert footer.startswith(words), footer
    assert footer.endswith(f" · {MEANINGS[choice.route]} · 9.9 tokens/s")
    rendered = render_transcript([Message(1, "assistant", "ok", {
        "route": choice.route, "route_reason": choice.reason, "machines": machines})])
    assert "\\" not in words and words in rendered.markdown.replace("\\", "")
    if requested == "auto":
        label = model_choices([{"id": "m", "covey": {
            "routes": [choice.route], "machines": machines,
            "auto": {"route": choice.route, "reason": choice.reason}}}])[0][1]
        because = label.split(", because ", 1)[1]
        assert f"because {because}" in footer


def test_a_reason_from_a_newer_node_is_shown_as_it_came() -> None:
    footer = served_line({"route": "local", "route_reason": "the moon was full"})
    assert footer.startswith("Ran on this machine, because the moon was full")


def test_search_finds_an_old_message(run_async, qtbot, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with main_window(tmp_path, monkeypatch) as window:
        chat = window.chat
        old = chat.store.create("tiny")
        chat.store.add(old.id, "user", "Where should we travel?")
        chat.store.add(old.id, "assistant", "Mongolia in summer: the capital, Ulaanbaatar, "
                       "hosts the Naadam festival every July.")
        for topic in ("Cooking rice", "Python decorators"):
            conv = chat.store.create("tiny")
            chat.store.add(conv.id, "user", topic)
        chat._reload_sidebar()
        assert chat.sidebar.count() == 3 and chat.conversation_id != old.id

        qtbot.keyClicks(chat.search, "ulaanBAATAR")
        assert chat.sidebar.count() == 1
        hit = chat.sidebar.item(0)
        assert hit.text().startswith("Where should we travel?\n")
        assert "Ulaanbaatar, hosts the Naadam" in hit.text()
        chat.sidebar.setCurrentItem(hit)
        assert chat.conversation_id == old.id
        assert chat.transcript.textCursor().selectedText() == "Ulaanbaatar"

        chat.search.setText("Naadam festival in winter")
        assert chat.sidebar.count() == 0 and chat.conversation_id == old.id  # still open
        chat.search.setText("cooking")  # titles match too
        assert [chat.sidebar.item(i).text().split("\n")[0]
                for i in range(chat.sidebar.count())] == ["Cooking rice"]
        chat.search.clear()
        assert chat.sidebar.count() == 3


def test_export_round_trips_and_imports(qapp: QApplication, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with main_window(tmp_path, monkeypatch) as window:
        chat = window.chat
        conv = chat.store.create("tiny")
        chat.store.add(conv.id, "system", "Be brief.")
        chat.store.add(conv.id, "user", "Qu'est-ce que <html> ? ✓")
        chat.store.add(conv.id, "assistant", "```html\n<p>para</p>\n```", {**SERVED,
                                                                           "tokens_per_s": 4.2})
        panel = ChatPanel("Answer in French.\nBriefly.", 0.2, 64, "here")
        chat.store.set_panel(conv.id, panel)
        pick(chat, conv.id)
        saved = [(m.role, m.content, m.meta) for m in chat.store.messages(conv.id)]

        chat.export_to(tmp_path / "chat.json")
        export = from_json((tmp_path / "chat.json").read_text(encoding="utf-8"))
        assert [(m.role, m.content, m.meta) for m in export.messages] == saved
        assert export.title == "Qu'est-ce que <html> ? ✓" and export.model == "tiny"
        assert json.loads((tmp_path / "chat.json").read_text())["version"] == 1
        assert export.panel == panel

        chat.import_from(tmp_path / "chat.json")
        assert chat.conversation_id != conv.id and len(chat.store.list()) == 2
        again = [(m.role, m.content, m.meta) for m in chat.store.messages(chat.conversation_id)]
        assert again == saved
        assert chat.sidebar.currentItem().text() == export.title
        assert chat.store.panel(chat.conversation_id) == panel == chat.panel.values()

        chat.export_to(tmp_path / "chat.md")
        markdown = (tmp_path / "chat.md").read_text(encoding="utf-8")
        assert markdown.startswith("# Qu'est-ce que <html> ? ✓\n")
        assert "## You\n\nQu'est-ce que <html> ? ✓" in markdown
        assert "## Covey\n\n```html\n<p>para</p>\n```" in markdown
        assert "_Ran on this machine (desk), because it fits" in markdown
        assert "System prompt:\n\n> Answer in French.\n> Briefly." in markdown

        # A file from before panels imports with Covey's defaults in the panel.
        old = json.loads((tmp_path / "chat.json").read_text())
        del old["panel"]
        (tmp_path / "old.json").write_text(json.dumps(old))
        chat.import_from(tmp_path / "old.json")
        assert len(chat.store.list()) == 3
        assert chat.store.panel(chat.conversation_id) == ChatPanel() == chat.panel.values()

        (tmp_path / "bad.json").write_text('{"version": 7, "messages": []}')
        chat.import_from(tmp_path / "bad.json")
        assert "newer Covey" in chat.notice.text() and len(chat.store.list()) == 3


def test_edit_and_resend_replaces_the_last_turn(run_async, qtbot, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    node = FakeNode("Lyon is not the capital.")

    async def body() -> None:
        with main_window(tmp_path, monkeypatch, node) as window:
            chat = window.chat
            conv = chat.store.create("tiny")
            for role, text in (("user", "Hi"), ("assistant", "Hello!"),
                               ("user", "What is the capitol of Frnace?"),
                               ("assistant", "I do not know Frnace.")):
                chat.store.add(conv.id, role, text)
            shown(window, qtbot)
            pick(chat, conv.id)
            chat.edit_button.click()
            assert chat.input.toPlainText() == "What is the capitol of Frnace?"
            assert "Editing" in chat.notice.text()
            qtbot.keyClick(chat.input, Qt.Key.Key_Escape)  # Esc cancels the edit
            assert chat.input.toPlainText() == "" and chat._editing is None

            chat.edit_button.click()
            chat.input.setPlainText("What is the capital of France?")
            qtbot.keyClick(chat.input, Qt.Key.Key_Return)
            await replied(chat)
            assert [(m.role, m.content.strip()) for m in chat.store.messages(conv.id)] == [
                ("user", "Hi"), ("assistant", "Hello!"),
                ("user", "What is the capital of France?"),
                ("assistant", "Lyon is not the capital.")]
            assert [m["content"] for m in node.asked[-1]] == [
                "Hi", "Hello!", "What is the capital of France?"]

    run_async(body())


def test_send_waits_while_covey_starts_and_sends_when_ready(
        run_async, qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = FakeNode()

    async def body() -> None:
        with main_window(tmp_path, monkeypatch, node, ready=False) as window:
            chat, controller = window.chat, window.controller
            controller.node_state.emit(NodeState("starting", "Starting this machine's node…"))
            assert not chat.send_button.isEnabled() and chat.send_button.text() == STARTING
            qtbot.keyClicks(chat.input, "Are you there?")
            qtbot.keyClick(chat.input, Qt.Key.Key_Return)
            assert chat.notice.text() == STARTING_NOTICE and chat.store.list() == []
            controller.node_state.emit(NodeState("running"))
            assert not chat.send_button.isEnabled()  # no models listed yet
            controller.models.emit({"runnable": [TINY]})  # ready: the message goes
            assert chat.notice.text() == "" and chat.send_button.text() == "Send"
            await replied(chat)
            assert [m.role for m in chat.store.messages(chat.conversation_id)] == [
                "user", "assistant"]
            assert node.asked[0][-1]["content"] == "Are you there?"

            # A node restart (new settings) waits again.
            controller.node_state.emit(NodeState("restarting"))
            assert not chat.send_button.isEnabled()

    run_async(body())


def test_no_model_notice_goes_when_a_model_appears(run_async, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        with main_window(tmp_path, monkeypatch, ready=False) as window:
            chat, controller = window.chat, window.controller
            controller.node_state.emit(NodeState("running"))
            controller.models.emit({"runnable": []})
            assert chat.send_button.isEnabled()
            chat.input.setPlainText("hello?")
            chat.send_button.click()
            assert chat.notice.text() == NO_MODEL_NOTICE and chat.store.list() == []
            controller.models.emit({"runnable": [TINY]})
            assert chat.notice.text() != NO_MODEL_NOTICE
            await replied(chat)
            assert chat.store.messages(chat.conversation_id)[0].content == "hello?"

    run_async(body())
