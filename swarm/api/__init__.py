"""The node's local HTTP API: the h11 server on loopback, the OpenAI-compatible API and the
OpenAPI document."""
