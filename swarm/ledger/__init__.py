"""The ledger: the replicated map of signed, sealed entries (pure rules), its sync over the
swarm, the entries' schemas, and what the API shows about each peer."""
