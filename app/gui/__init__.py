"""The desktop app (PySide6 + qasync): window, pages, tray, and its link to the node."""
