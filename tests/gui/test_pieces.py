"""The app's pure parts without a node: conversations, settings, start at login, the words on
the pages, and what closing the window does."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest

from app.gui import app_settings, autostart
from app.gui.conversations import DEFAULT_TITLE, ConversationStore, Message, title_from
from app.gui.desktop import CoveyApp
from app.gui.pages.chat import model_choices, served_line, transcript_markdown
from app.gui.pages.models import model_rows
from app.gui.pages.settings import context_now
from app.gui.pages.swarm import check_token, peer_row, serving_edges
from swarm.trust.token import new_token


def test_conversations_persist_rename_and_delete(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    first = store.create("tiny")
    second = store.create("tiny")
    store.add(first.id, "user", "What is the   capital\nof France?")
    reply = store.add(first.id, "assistant", "Par")
    store.update(reply.id, "Paris.", {"route": "local", "machines": ["vm"]})
    store.rename(second.id, "  Shopping   list ")
    store.close()

    again = ConversationStore(tmp_path)
    titles = {c.id: c.title for c in again.list()}
    assert titles == {first.id: "What is the capital of France?", second.id: "Shopping list"}
    assert again.list()[0].id == first.id  # most recent activity first
    messages = again.messages(first.id)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "What is the   capital\nof France?"), ("assistant", "Paris.")]
    assert messages[1].meta["machines"] == ["vm"]
    again.delete(first.id)
    assert again.messages(first.id) == [] and [c.id for c in again.list()] == [second.id]
    again.rename(second.id, "   ")
    assert again.get(second.id).title == DEFAULT_TITLE


def test_a_database_from_a_newer_covey_is_refused(tmp_path: Path) -> None:
    ConversationStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "conversations.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer Covey"):
        ConversationStore(tmp_path)


def test_titles_are_one_line_cut_at_a_word() -> None:
    assert title_from("  hello \n world ") == "hello world"
    long = title_from("word " * 30)
    assert long.endswith("…") and len(long) <= 49 and "  " not in long
    assert title_from("") == DEFAULT_TITLE


def test_settings_round_trip_and_bad_values_keep_defaults(tmp_path: Path) -> None:
    chosen = app_settings.AppSettings(share_mib=2048, threads=2, lan_only=True,
                                      api_enabled=True, api_port=12000,
                                      listen=("/ip4/127.0.0.1/tcp/0",))
    app_settings.save(tmp_path, chosen)
    assert app_settings.load(tmp_path) == chosen
    assert (tmp_path / app_settings.SETTINGS_FILE).stat().st_mode & 0o077 == 0
    assert app_settings.node_arguments(chosen) == [
        "--lan-only", "--threads", "2", "--api-port", "12000",
        "--listen", "/ip4/127.0.0.1/tcp/0"]
    (tmp_path / app_settings.SETTINGS_FILE).write_text(json.dumps(
        {"version": 1, "share_mib": -5, "api_port": 99999, "lan_only": "yes", "threads": True,
         "keep_in_tray": False, "mystery": 1}))
    loaded = app_settings.load(tmp_path)
    assert loaded == app_settings.AppSettings(keep_in_tray=False)
    (tmp_path / app_settings.SETTINGS_FILE).write_text("{not json")
    assert app_settings.load(tmp_path) == app_settings.AppSettings()


def test_the_context_setting_becomes_ctx_only_once_chosen() -> None:
    assert "--ctx" not in app_settings.node_arguments(app_settings.AppSettings())
    chosen = app_settings.AppSettings(ctx=8192)
    assert app_settings.node_arguments(chosen)[-2:] == ["--ctx", "8192"]
    assert app_settings.from_dict(json.loads(json.dumps(asdict(chosen)))) == chosen
    assert app_settings.from_dict({"version": 1, "ctx": -1}).ctx is None
    # Blank is automatic: no --ctx while the app never passed one; --ctx 0 after it did, so
    # that the node forgets the number it remembers.
    assert app_settings.ctx_from_field("4096", None) == 4096
    assert app_settings.ctx_from_field("", None) is None
    assert app_settings.ctx_from_field("", 8192) == 0
    assert app_settings.ctx_from_field("0", 0) == 0
    assert context_now({"ctx": {"setting": None, "loaded": 32768}}) == "now 32,768 tokens"
    assert context_now({"ctx": {"setting": 512, "loaded": None}}) == ""
    assert context_now({}) == ""  # a node that does not say


def test_start_at_login_on_linux_writes_and_removes_an_xdg_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    autostart.set_enabled(True, ["/opt/covey/bin/covey"])
    entry = tmp_path / "autostart" / "covey.desktop"
    text = entry.read_text()
    assert "Exec=/opt/covey/bin/covey" in text and "Type=Application" in text
    autostart.set_enabled(False)
    assert not entry.exists()
    autostart.set_enabled(False)  # turning it off twice is fine


def test_token_check_names_the_problem() -> None:
    mine = new_token().encode()
    assert "not a Covey swarm token" in check_token("12D3KooWAbc", mine)
    assert check_token(mine, mine) == "This machine is already in this swarm."
    assert check_token(new_token().encode(), mine) is None
    assert check_token("", mine) == ""


def test_peer_rows_and_edges() -> None:
    peers = [
        {"peer_id": "a", "name": "desk", "os": "Linux", "ram_total": 16 << 30, "online": True,
         "self": True, "roles": [], "worker": None, "last_seen": 0},
        {"peer_id": "b", "name": "laptop", "os": "macOS", "ram_total": 8 << 30,
         "online": True, "roles": ["worker"], "last_seen": 100.0,
         "worker": {"donated_bytes": 4 << 30, "state": "leased", "leased_by": "a",
                    "leased_by_name": "desk"}},
        {"peer_id": "c", "name": "old", "os": "Linux", "online": False, "roles": [],
         "worker": None, "last_seen": 0.0},
    ]
    assert peer_row(peers[1], 130.0) == ["laptop", "macOS", "8.0 GiB", "4.0 GiB", "worker",
                                         "serving desk", "30 s ago"]
    assert peer_row(peers[2], 10_000.0)[5] == "offline"
    assert serving_edges(peers) == [("laptop", "desk")]
    relayed = {**peers[1], "worker": None, "link": "relayed via office"}
    assert peer_row(relayed, 130.0)[5] == "online · relayed via office"


def test_reply_footer_and_model_labels() -> None:
    meta = {"route": "sharded", "machines": ["w1 (7 layers)", "w2 (3 layers)"],
            "tokens_per_s": 12.345, "notice": "w3 left mid-reply; continuing on w1"}
    # The footer says in plain words where the reply ran, and explains the route's name.
    assert served_line(meta) == ("Ran split across w1 (7 layers), w2 (3 layers) · sharded route: "
                                 "each machine holds some of the model's layers · 12.3 tokens/s")
    text = transcript_markdown([Message(1, "user", "hi"), Message(2, "assistant", "hello", meta)])
    assert "> ⚠ w3 left mid-reply" in text and "*Ran split across" in text
    assert "sharded route" in text
    choices = model_choices([
        {"id": "small", "covey": {"routes": ["local", "federated"], "machines": ["vm"]}},
        {"id": "big", "covey": {"routes": ["sharded"], "machines": ["w1", "w2"]}}])
    assert choices == [("small", "small — runs on this machine"),
                       ("big", "big — runs split across w1, w2")]
    rows = model_rows([{"name": "small", "size": 1 << 30}], {
        "swarm": [{"name": "big", "size": 8 << 30, "machines": ["w1"]}],
        "runnable": [{"id": "small", "covey": {"routes": ["local"]}}]})
    assert [(r["name"], r["local"], r["runs"]) for r in rows] == [
        ("small", True, "this machine"), ("big", False, "copy it here first")]


def test_footer_and_picker_say_why_auto_chose_a_route() -> None:
    """The picker shows the node's own `auto` decision, the footer the reason it reported."""
    meta = {"route": "local", "route_reason": "fits this machine (needs 35.0 MiB, 3.0 GiB free "
            "here)", "machines": ["desk"]}
    assert served_line(meta) == ("Ran on this machine (desk), because it fits in this machine's "
                                 "free memory (needs 35.0 MiB; 3.0 GiB free) · local route: the "
                                 "whole model ran here")
    choices = model_choices([{"id": "small", "covey": {
        "routes": ["local", "sharded"], "machines": ["desk", "w1"],
        "auto": {"route": "local", "reason": "fits this machine (needs 35.0 MiB, 3.0 GiB free "
                 "here)"}}}])
    assert choices == [("small", "small — runs on this machine, because it fits in this "
                        "machine's free memory (needs 35.0 MiB; 3.0 GiB free)")]
    big = model_choices([{"id": "big", "covey": {
        "routes": ["local", "sharded"], "machines": ["desk", "w1"],
        "auto": {"route": "sharded", "reason": "needs 8.0 GiB, 3.0 GiB free here; spread "
                 "over w1"}}}])
    assert big == [("big", "big — runs split across w1, because it is too big for this "
                    "machine's free memory alone (needs 8.0 GiB; 3.0 GiB free)")]


def test_closing_the_window_keeps_a_worker_in_the_tray_and_says_so_once(
        run_async, tmp_path: Path) -> None:  # noqa: ANN001
    async def body() -> None:
        app = CoveyApp(tmp_path)
        shown: list[str] = []
        app.tray.showMessage = lambda title, *rest: shown.append(title)  # type: ignore
        app.tray_available = True
        try:
            app.window.show()
            app.tray.show_status({"worker": {"enabled": True}, "federated": {"enabled": False}})
            app.window.close()
            assert not app.window.isVisible() and not app.quitting.done()
            app.window.show()
            app.window.close()
            assert shown == ["Covey is still running"]  # once, not at every close
            assert app_settings.load(tmp_path).tray_notice_shown
            app.tray.show_status({"worker": {"enabled": False}, "federated": {}})
            app.window.show()
            app.window.close()
            assert app.quitting.done()  # no role: closing the window quits
        finally:
            await app.shutdown()

    run_async(body())


def test_this_pyside_does_not_leak_references_to_none(qapp) -> None:  # noqa: ANN001
    """PySide6 6.12.0 dropped a reference to None per signal delivered to a Python slot with
    an argument, and the app aborted after a few thousand (every keystroke in a text box)."""
    import sys

    from PySide6.QtWidgets import QLineEdit

    box = QLineEdit()
    seen: list[str] = []
    box.textChanged.connect(lambda text: seen.append(text) and None)
    before = sys.getrefcount(None)
    for i in range(2000):
        box.setText(str(i))
    assert len(seen) == 2000
    assert sys.getrefcount(None) - before > -100
