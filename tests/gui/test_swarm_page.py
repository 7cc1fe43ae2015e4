"""The Swarm page's small courtesies: Show becomes Hide, the headless command carries the real
token (masked until shown), and an empty peer list says what to do."""

from __future__ import annotations

from pathlib import Path

from app.gui.desktop import CoveyApp
from app.gui.node_supervisor import ensure_token


def test_show_hide_the_headless_command_and_the_empty_peer_list(run_async,  # noqa: ANN001
                                                                tmp_path: Path) -> None:
    token = ensure_token(tmp_path).token

    async def body() -> None:
        app = CoveyApp(tmp_path)  # the node is not started: no peers yet
        try:
            page = app.window.swarm
            assert token not in page.headless.text() and token[:6] in page.headless.text()
            assert "covey node --token -" in page.headless.text()
            page.show_button.click()
            assert page.show_button.text() == "Hide" and token in page.headless.text()
            page.show_button.click()
            assert page.show_button.text() == "Show" and token not in page.headless.text()
            assert page.table.isHidden() and not page.empty.isHidden()
            assert "No machines yet" in page.empty.text()
            page.show_peers([{"peer_id": "p", "name": "me", "online": True, "self": True}])
            assert not page.table.isHidden() and page.empty.isHidden()
        finally:
            await app.shutdown()

    run_async(body())
