"""What the tests share: network namespaces, a node harness, probes, a tiny GGUF, a faulty
HTTP server."""
