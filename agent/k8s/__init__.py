"""Kubernetes adapters: the only package that imports ``kubernetes``.

The rest of the agent talks to these through plain dicts and our own frozen types
(``CachedModelObj``, label dicts), so the loop never sees ``V1Node`` or generated models.
"""
