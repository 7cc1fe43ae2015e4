"""The node daemon: its lifecycle, its remembered settings, model copies, and `covey node`."""
