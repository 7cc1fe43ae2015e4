"""Covey's user-facing layer: the command line (`app/cli`) and the desktop app (`app/gui`).

Imports point one way: app -> swarm -> backends.
"""
