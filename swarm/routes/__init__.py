"""Routes: the ways a node serves a generation (local, federated, sharded), the choice among
them, and the placement of a model's layers on workers."""
