"""Runtime: the agent loop, fills and scrub wired from the adapters (cache, sources, k8s, metrics)."""
