"""What the terminal and the desktop app share, with no Qt in it: the chat request and the
folding of its streamed reply (`chat_request`), and "time ago" for people (`elapsed`)."""
