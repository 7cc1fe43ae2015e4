"""Tests with real processes, real llama.cpp, real libp2p hosts and network namespaces."""
