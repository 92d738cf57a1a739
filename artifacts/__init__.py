"""Artifact store: content keys, atomic writes, manifests, locks.  Knows nothing about models."""

from .digest import canonical_json, file_digest, text_digest, value_digest
from .faults import kill_point
from .lock import RunLock, RunLocked
from .run import RunDir, RunMismatch
from .store import ArtifactRef, Store, external_ref, write_text_atomic

__all__ = [
    "ArtifactRef",
    "RunDir",
    "RunMismatch",
    "RunLock",
    "RunLocked",
    "Store",
    "canonical_json",
    "external_ref",
    "file_digest",
    "kill_point",
    "text_digest",
    "value_digest",
    "write_text_atomic",
]
