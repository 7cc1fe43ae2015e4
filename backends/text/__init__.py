"""Text around the engine: chat templates and stop strings."""
