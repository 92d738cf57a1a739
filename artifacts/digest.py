"""Content digests and canonical JSON: the two things artifact keys are made of."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20
_RACY_NS = 2_000_000_000  # files younger than this are hashed again next time


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed so that multi-GB weights do not load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class DigestCache:
    """File digests remembered by (path, size, mtime): an unchanged file is not read again.

    Re-hashing a 13 GB checkpoint on every resume costs minutes; a file whose size and
    modification time are unchanged is taken to be unchanged (what rsync and make assume).
    ``fresh=True`` re-reads every file (``bonsai verify``).  The cache is one JSON file,
    replaced atomically; concurrent writers can only lose entries, which are recomputed.
    """

    def __init__(self, file: str | os.PathLike, fresh: bool = False):
        self.file, self.fresh = Path(file), fresh
        self._entries: dict[str, str] | None = None
        self._changed = False

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.file.read_text()) if self.file.is_file() else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def digest(self, path: str | os.PathLike) -> str:
        return self.remember([path], lambda: file_digest(path))

    def remember(self, paths: Sequence[str | os.PathLike], compute: Callable[[], str], kind: str = "") -> str:
        """``compute()``, a digest of the files ``paths`` (``kind`` says which), remembered by
        their (path, size, mtime)."""
        stats = [(Path(p).resolve(), os.stat(p)) for p in paths]
        stamp = kind + ";".join(f"{p}|{s.st_size}|{s.st_mtime_ns}" for p, s in stats)
        entries = self._load()
        if not self.fresh and stamp in entries:
            return entries[stamp]
        digest = compute()
        # A file modified within the filesystem's timestamp granularity of being hashed could
        # change again under the same stamp ("racy git"): only older files are remembered.
        if time.time_ns() - max((s.st_mtime_ns for _, s in stats), default=0) > _RACY_NS:
            entries[stamp], self._changed = digest, True
        return digest

    def save(self) -> None:
        if self._changed:
            from bonsai.artifacts.store import write_text_atomic

            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.file, json.dumps(self._entries, indent=0, sort_keys=True))
            self._changed = False


# a config field's metadata: the field was added after its stage's artifacts were first keyed, and
# at its default it computes what they did, so there it is left out of the key (and the manifest)
# and those artifacts stay found
KEYED_OFF_DEFAULT = "keyed_off_default"


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        return {
            f.name: _plain(getattr(obj, f.name))
            for f in fields
            if not (f.metadata.get(KEYED_OFF_DEFAULT) and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN has no JSON form; keep keys stable anyway
        return "NaN"
    return obj


def canonical_json(obj: Any) -> str:
    """One byte-stable JSON text per value: sorted keys, no whitespace, dataclasses as dicts."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def value_digest(obj: Any) -> str:
    return text_digest(canonical_json(obj))
