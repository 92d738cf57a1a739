"""A run directory: its identity, its lock, and the store inside it.

``run.json`` records what the run is (digests of the model and data, the config fields
that change results).  Re-running the same command resumes; a command that would change
any of these is refused rather than mixing two runs' artifacts in one directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bonsai.artifacts.lock import RunLock
from bonsai.artifacts.store import DIGESTS, Store, write_text_atomic

IDENTITY_FILE = "run.json"
SUMMARY_FILE = "summary.json"  # written when the run finishes; "result" names its final artifact
_OWN = {IDENTITY_FILE, DIGESTS, ".lock", ".tmp", ".work"}


class RunMismatch(Exception):
    """The directory holds a different run (or no run at all)."""

    def __init__(self, path: Path, differences: list[str]):
        self.path, self.differences = path, differences
        super().__init__(f"{path}: " + "; ".join(differences))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"]
    return []


class RunDir:
    """``format`` is written into a new run.json; ``upgrade`` maps a recorded run.json to the
    identity it stands for in this version's terms (runs made by earlier versions keep
    resuming when a name or a default changes)."""

    def __init__(
        self,
        path: str | os.PathLike,
        format: int = 1,
        upgrade: Callable[[dict], dict] = lambda recorded: recorded.get("identity", {}),
    ):
        self.path = Path(path)
        self.store = Store(self.path)
        self.lock = RunLock(self.path)
        self.format, self.upgrade = format, upgrade

    def lineage(self) -> set[tuple[str, str]] | None:
        """(stage, key) of every artifact the finished run's result rests on; None until the
        run has finished.  Readers use it to skip work that an earlier version of a stage left
        in the same directory before the run was resumed with a newer one."""
        file = self.path / SUMMARY_FILE
        result = json.loads(file.read_text()).get("result") if file.is_file() else None
        return self.store.lineage(result["stage"], result["key"]) if result else None

    def recorded(self) -> dict | None:
        file = self.path / IDENTITY_FILE
        return json.loads(file.read_text()) if file.is_file() else None

    def check(self, identity: dict) -> bool:
        """True if this resumes an existing run, False if the run is new; raises on mismatch."""
        recorded = self.recorded()
        if recorded is None:
            if self.path.is_dir() and any(p.name not in _OWN for p in self.path.iterdir()):
                raise RunMismatch(self.path, ["the directory exists and is not a bonsai run"])
            return False
        differences = _diff(self.upgrade(recorded), identity)
        if differences:
            raise RunMismatch(self.path, differences)
        return True

    def probe(self, identity: dict) -> bool:
        """``open``'s checks without changing anything: raises if locked or different."""
        if self.path.is_dir():
            self.lock.acquire()
            self.lock.release()
        return self.check(identity)

    def open(self, identity: dict, described: dict) -> bool:
        """Lock the directory (held until ``close``), check or record the identity, clear
        half-built artifacts.  Returns True when resuming."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            resuming = self.check(identity)
            if not resuming:
                record = {"format": self.format, "identity": identity, "described": described}
                write_text_atomic(self.path / IDENTITY_FILE, json.dumps(record, indent=1, sort_keys=True))
            self.store.clear_partial()
        except BaseException:
            self.lock.release()
            raise
        return resuming

    def close(self) -> None:
        self.lock.release()

    def discard_if_empty(self) -> bool:
        """Remove a run that holds no finished artifact yet (only run.json, lock, scratch)."""
        if not self.path.is_dir() or any(p.name not in _OWN for p in self.path.iterdir()):
            return False
        self.store.clear_partial()
        for name in (IDENTITY_FILE, DIGESTS, ".tmp"):
            target = self.path / name
            target.rmdir() if target.is_dir() else target.unlink(missing_ok=True)
        self.lock.release()
        (self.path / ".lock").unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass
        return True
