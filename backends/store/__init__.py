"""The model store: this machine's GGUF files and their manifests, imports, downloads, and
the lock that lets the node, the app and the command line change it together."""
