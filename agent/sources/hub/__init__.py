"""The Hugging Face Hub (or an HF_ENDPOINT mirror) as a source: metadata via huggingface_hub, bytes via
hf_transfer or a plain HTTP client, every byte checked against the Hub's published digests.

Why not just call ``snapshot_download``: it checks only sizes (never hashes), cannot resume across
process restarts, and writes straight into the cache workers read. Here the store stages, verifies
and publishes; this package only plans and moves bytes, one module per job:

    metadata.py   resolve: revision -> commit, the tree listing -> a ModelPlan (listing checks)
    client.py     byte GETs with Range resume; redirects by hand (the token never leaves the origin)
    transfer.py   hf_transfer in a supervised child process (large files), salvage of its scratch file
    xet.py        Xet-only servers, best effort
    classify.py   HTTP statuses and library exceptions -> our error classes, redacted
    _hf.py        every huggingface_hub name we use; the private ones listed (tests/test_hf_private_api.py)
    source.py     HubSource: wires them, retries with ``retry_call`` under ``settings.retry``
"""

from agent.sources.hub.source import DEFAULT_ENDPOINT, HubSource, open_source

__all__ = ["DEFAULT_ENDPOINT", "HubSource", "open_source"]
