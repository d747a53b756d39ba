"""The node's cache: pure layout math, hashing, manifests and the crash-safe store."""
