#!/usr/bin/env bash
# Quick start: set up whatever is missing, then start Covey on the bundled default model:
# the desktop app where there is a display, else a chat in the terminal.
# Arguments go to `covey chat` (for example: ./start.sh "Why is the sky blue?").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
if [ "$#" -eq 0 ] && { [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; }; then
    exec .venv/bin/covey
fi
if [ "$#" -eq 0 ] && [ ! -t 0 ]; then
    cat <<'MSG'
Covey is set up. No terminal is attached, so there is nobody to chat with here. To chat:
  .venv/bin/covey chat                      an interactive chat, in a terminal
  .venv/bin/covey chat "your question"      one answer, streamed
  .venv/bin/covey chat "your question" --json
MSG
    exit 0
fi
exec .venv/bin/covey chat "$@"
