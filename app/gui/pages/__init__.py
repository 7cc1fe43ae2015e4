"""The main window's pages: chat, swarm, models, settings."""
