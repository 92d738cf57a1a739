"""Artifact store: content keys, atomic writes, manifests, locks.  Knows nothing about models."""

from bonsai.artifacts.digest import DigestCache, canonical_json, file_digest, text_digest, value_digest
from bonsai.artifacts.faults import kill_point
from bonsai.artifacts.lock import RunLock, RunLocked
from bonsai.artifacts.run import RunDir, RunMismatch
from bonsai.artifacts.store import (
    ArtifactRef,
    Store,
    external_ref,
    library_changes,
    library_versions,
    write_text_atomic,
)

__all__ = [
    "ArtifactRef",
    "DigestCache",
    "RunDir",
    "RunMismatch",
    "RunLock",
    "RunLocked",
    "Store",
    "canonical_json",
    "external_ref",
    "file_digest",
    "kill_point",
    "library_changes",
    "library_versions",
    "text_digest",
    "value_digest",
    "write_text_atomic",
]
