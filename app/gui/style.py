"""The app's look: one style sheet, in the palette of Covey's icon (deep teal, warm white)."""

from __future__ import annotations

ACCENT = "#1f6f6b"
ACCENT_LIGHT = "#e3f1ef"

STYLE_SHEET = f"""
QListWidget#nav {{
    border: none;
    background: {ACCENT};
    color: #fdf8ef;
    font-size: 11pt;
    padding-top: 12px;
}}
QListWidget#nav::item {{ padding: 10px 14px; }}
QListWidget#nav::item:selected {{ background: #fdf8ef; color: {ACCENT}; }}
QListWidget#conversations::item {{ padding: 6px 4px; }}
QListWidget#conversations::item:selected {{ background: {ACCENT_LIGHT}; color: black; }}
QPushButton {{ padding: 5px 12px; }}
QPushButton:default {{ background: {ACCENT}; color: white; border-radius: 4px;
                       padding: 6px 16px; }}
QPushButton:default:disabled {{ background: #9bbcb9; }}
QTextBrowser#transcript {{ padding: 10px; font-size: 10.5pt; }}
QGroupBox {{ font-weight: bold; }}
QLabel#chatNotice {{ color: #9a6700; }}
QTableWidget {{ alternate-background-color: #f6f8f8; }}
"""
