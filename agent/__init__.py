"""model-cache-agent: keeps a node-local Hugging Face cache warm, verified and labelled."""

__version__ = "0.1.0"
