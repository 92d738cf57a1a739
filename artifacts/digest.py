"""Content digests and canonical JSON: the two things artifact keys are made of."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed so that multi-GB weights do not load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
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
