"""Where bonsai keeps per-user caches (model digests, the demo's trained parent)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$BONSAI_CACHE, else $XDG_CACHE_HOME/bonsai, else ~/.cache/bonsai."""
    if os.environ.get("BONSAI_CACHE"):
        return Path(os.environ["BONSAI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bonsai"
