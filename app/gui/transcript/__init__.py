"""How a conversation is shown and written out: Markdown, the view, exports, route words."""
