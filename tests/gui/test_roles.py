"""Worker and federated mode switched on the Swarm page stay on: after the node restarts (a
setting that restarts it) and after the app itself restarts, with a message each time."""

from __future__ import annotations

from pathlib import Path

from app.gui import app_settings
from app.gui.desktop import CoveyApp
from app.gui.roles import Roles, change_message, missing
from tests.gui.conftest import app_data_dir, until
from tests.gui.test_app import desktop


def both_on(app: CoveyApp) -> bool:
    status = app.controller.last_status
    return bool(status.get("worker", {}).get("enabled")
                and status.get("federated", {}).get("enabled"))


def test_roles_survive_a_node_restart_and_an_app_restart(run_async, tmp_path: Path,
                                                         tiny_model: Path) -> None:
    data_dir = app_data_dir(tmp_path, "app", tiny_model)

    async def switch_on_then_restart_the_node() -> None:
        async with desktop(data_dir) as app:
            roles = app.window.swarm.roles
            await until(lambda: roles.model.findText("tiny") >= 0, 30, "the tiny model")
            roles.model.setCurrentText("tiny")
            roles.share.setValue(0.5)
            roles.worker.click()  # the user ticks the switches on the Swarm page
            await until(lambda: app.controller.last_status["worker"]["enabled"], 60,
                        "worker mode on")
            assert "Worker mode on" in roles.message.text()
            roles.federated.click()
            await until(lambda: both_on(app), 30, "federated mode on")
            assert app.controller.last_status["federated"]["models"] == ["tiny"]
            assert app.tray.worker_action.isChecked() and app.tray.federated_action.isChecked()
            assert "512.0 MiB" in roles.state.text()

            # A setting that restarts the node (as Settings > Save does): roles come back.
            await app.controller.supervisor.restart()
            await until(lambda: "back on, as you chose" in roles.message.text(), 30,
                        "the message that the roles are being restored")
            await until(lambda: "on again" in roles.message.text() and both_on(app), 60,
                        "both roles on after the node restart")
            assert app.controller.last_status["worker"]["share_bytes"] == 512 << 20

    async def reopen() -> None:
        async with desktop(data_dir) as app:
            roles = app.window.swarm.roles
            await until(lambda: "on again" in roles.message.text() and both_on(app), 60,
                        "both roles on after the app restart, and a message saying so")
            await until(lambda: roles.worker.isChecked() and roles.federated.isChecked(), 10,
                        "the switches to show it")
            roles.worker.click()  # and off again, which is remembered too
            await until(lambda: not app.controller.last_status["worker"]["enabled"], 60,
                        "worker mode off")

    run_async(switch_on_then_restart_the_node())
    saved = app_settings.load(data_dir)
    assert saved.worker and saved.federated and saved.federated_model == "tiny"
    assert saved.share_mib == 512
    run_async(reopen())
    assert not app_settings.load(data_dir).worker
    assert app_settings.load(data_dir).federated


def test_role_words_say_what_changed_and_who_changed_it() -> None:
    off, worker = Roles(), Roles(worker=True)
    assert change_message(off, worker, worker) == "Worker mode on."
    assert "the node changed it" in change_message(worker, off, None)
    assert change_message(worker, worker, None) == ""
    assert missing(Roles(True, True), Roles(True, False)) == Roles(False, True)
    assert missing(Roles(False, False), Roles(True, True)) == Roles()
