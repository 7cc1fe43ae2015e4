"""The swarm node: token, identity, libp2p host, ledger, roles, placement, routing.

Knows nothing of Qt; uses `backends` for inference.
"""
