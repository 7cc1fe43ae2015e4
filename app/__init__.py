"""Covey's user-facing layer: the command line now, the Qt desktop app later.

Imports point one way: app -> swarm -> backends.
"""
