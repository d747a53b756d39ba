"""Fill from a shared PVC: an HF cache, a ``hf download --local-dir`` folder or a plain folder per model.

    tree.py      fd-based, O_NOFOLLOW, non-blocking reads under the PVC root; folder identities
    layouts.py   the three shapes, each planned into files with expected digests (or none)
    source.py    PvcSource: resolve (find the layout) and fetch (copy with fstat checks)
"""

from agent.sources.pvc.source import PvcPlan, PvcSource, open_source

__all__ = ["PvcPlan", "PvcSource", "open_source"]
