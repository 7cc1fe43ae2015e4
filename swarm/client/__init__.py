"""Clients of the node's local API: a blocking one for the command line, an asyncio one for the
desktop app."""
