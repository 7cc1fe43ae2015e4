"""The desktop app's longest Qt event-loop stall while a model loads and while a reply streams.

Runs the real app (offscreen Qt, a real node on loopback, the bundled Gemma 3 270M) with the
chat's side panel open, ticks a 5 ms QTimer, and reports the longest gap between ticks in each
phase next to an idle baseline measured in the same run. Target: at most 50 ms. Beside each
stall: the longest the Qt thread itself worked between two ticks (its CPU time), which other
programs on a busy machine do not stretch as they stretch the stall.

    QT_QPA_PLATFORM=offscreen .venv/bin/python bench/gui.py [--panel closed]

`--panel closed` is the baseline for the panel's own cost, on a machine as busy as the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qasync  # noqa: E402
from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app.gui import app_settings  # noqa: E402
from backends.store.model_store import DEFAULT_MODEL  # noqa: E402

TARGET_MS = 50.0
TICK_MS = 5
PROMPTS = (
    "Write a short story about a flock of birds that learns to share the sky.",
    "Write a Python function that sorts a list with merge sort, with comments.",
    "Explain how a bicycle works to a ten-year-old, in several paragraphs.",
)
# The transcript is redrawn while a reply streams, so the last prompt goes to a conversation
# that already holds this many earlier exchanges (20 messages), each reply with a code block to
# shade and label; that conversation has a system prompt and its own sampling in the side panel.
EARLIER_EXCHANGES = 10
SYSTEM_PROMPT = "You are a patient teacher. Answer in short paragraphs."
EARLIER_TEXT = ("Birds fly in formation to save energy: each one rides the updraft of the wing "
                "tip ahead of it, and they take turns at the front. ") * 3 + (
    "\n\n```python\ndef lead(flock):\n    return flock[1:] + flock[:1]  # take turns\n```\n")


class StallMeter:
    def __init__(self) -> None:
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.last = time.monotonic()
        self.worst = 0.0
        self.ticks = 0
        self.last_cpu = time.thread_time()
        self.busiest = 0.0  # the most CPU time the Qt thread used between two ticks

    def _tick(self) -> None:
        now, cpu = time.monotonic(), time.thread_time()
        self.worst = max(self.worst, now - self.last)
        self.busiest = max(self.busiest, cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu
        self.ticks += 1

    def start(self) -> None:
        self.last, self.worst, self.ticks = time.monotonic(), 0.0, 0
        self.last_cpu, self.busiest = time.thread_time(), 0.0
        self.timer.start()

    def busiest_ms(self) -> float:
        return self.busiest * 1000

    def stop(self) -> float:
        self.timer.stop()
        return self.worst * 1000


async def measure(panel_open: bool) -> dict[str, float]:
    from app.gui.desktop import CoveyApp

    data_dir = Path(tempfile.mkdtemp(prefix="covey-bench-gui-"))
    app_settings.save(data_dir, app_settings.AppSettings(
        lan_only=True, listen=("/ip4/127.0.0.1/tcp/0",)))
    app = CoveyApp(data_dir)
    meter = StallMeter()
    results: dict[str, float] = {}
    try:
        await app.start()
        chat = app.window.chat
        chat.show_panel(panel_open)
        meter.start()
        await asyncio.sleep(3)
        results["idle"] = meter.stop()

        async def reply(prompt: str) -> None:
            chat.model_picker.setCurrentIndex(max(chat.model_picker.findData(DEFAULT_MODEL), 0))
            chat.input.setPlainText(prompt)
            chat.send_button.click()
            while chat._reply is not None:
                await asyncio.sleep(0.01)

        # The first request loads the model in the node; the window must stay live meanwhile.
        meter.start()
        started = time.monotonic()
        await reply("Write a haiku about the sea.")
        results["load_and_first_reply"] = meter.stop()
        results["load_busiest"] = meter.busiest_ms()
        results["load_s"] = time.monotonic() - started

        results["streaming"] = results["streaming_s"] = results["streaming_busiest"] = 0.0
        for i, prompt in enumerate(PROMPTS):
            chat.new_conversation()
            if i == len(PROMPTS) - 1:  # setting up, not measured
                for _ in range(EARLIER_EXCHANGES):
                    chat.store.add(chat.conversation_id, "user", "Tell me about formations.")
                    chat.store.add(chat.conversation_id, "assistant", EARLIER_TEXT)
                chat._show(chat.conversation_id)
                chat.panel.system_prompt.setPlainText(SYSTEM_PROMPT)
                chat.panel.temperature.setValue(0.3)
            meter.start()
            started = time.monotonic()
            await reply(prompt)
            stall = meter.stop()
            results["streaming"] = max(results["streaming"], stall)
            results["streaming_busiest"] = max(results["streaming_busiest"], meter.busiest_ms())
            results["streaming_s"] += time.monotonic() - started
        results["long_conversation"] = stall  # the last reply, after the earlier exchanges
        results["long_conversation_busiest"] = meter.busiest_ms()
        results["messages"] = len(chat.store.messages(chat.conversation_id))
        replies = [chat.store.messages(c.id)[-1] for c in chat.store.list()[:len(PROMPTS)]]
        results["tokens_per_s"] = sum(float(m.meta.get("tokens_per_s") or 0)
                                      for m in replies) / len(replies)
        results["transcript_chars"] = len(chat.transcript.toPlainText())
        results["panel_open"] = float(chat.panel.isVisible())
    finally:
        await app.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--panel", choices=("open", "closed"), default="open",
                        help="the chat's side panel during the run (default: open)")
    panel_open = parser.parse_args().panel == "open"
    qt = QApplication.instance() or QApplication([])
    loop = qasync.QEventLoop(qt)
    asyncio.set_event_loop(loop)
    with loop:
        r = loop.run_until_complete(measure(panel_open))
    print(f"idle:                 longest stall {r['idle']:6.1f} ms")
    print(f"model load + reply:   longest stall {r['load_and_first_reply']:6.1f} ms "
          f"over {r['load_s']:.1f} s  (target <= {TARGET_MS:.0f} ms: "
          f"{r['load_and_first_reply'] / TARGET_MS:.2f}x of budget; Qt thread's longest work "
          f"{r['load_busiest']:.1f} ms)")
    print(f"streaming reply:      longest stall {r['streaming']:6.1f} ms "
          f"over {r['streaming_s']:.1f} s ({len(PROMPTS)} replies, transcript "
          f"{r['transcript_chars']:.0f} chars) at {r['tokens_per_s']:.1f} tokens/s  "
          f"({r['streaming'] / TARGET_MS:.2f}x of budget; Qt thread's longest work "
          f"{r['streaming_busiest']:.1f} ms)")
    print(f"  of which the reply in a {r['messages']:.0f}-message conversation: "
          f"{r['long_conversation']:6.1f} ms, Qt thread's longest work "
          f"{r['long_conversation_busiest']:.1f} ms (side panel "
          f"{'open' if r['panel_open'] else 'closed'})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    sys.stdout.flush()
    os._exit(0)  # PySide6 can crash in the interpreter's teardown


if __name__ == "__main__":
    sys.exit(main())
