"""Worker mode and the path to a worker: the RPC worker process, leases, and the two links
that carry ggml RPC bytes between machines (libp2p tunnel, direct TLS)."""
