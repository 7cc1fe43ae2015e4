"""Inference engines and model files: llama.cpp engine and RPC worker processes, ggml
bindings, the model store and GGUF inspection. Knows nothing of the network or of Qt.
"""
