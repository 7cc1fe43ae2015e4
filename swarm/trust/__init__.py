"""Trust: the swarm token and every key derived from it, this node's identity, sealing, and
files only this user may read."""
