"""One process per run directory.

An advisory ``flock`` on ``RUN/.lock``: the kernel releases it when the holder dies, even by
SIGKILL or power loss, so a crashed run never leaves a stale lock that blocks the resume.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunLocked(Exception):
    def __init__(self, path: Path, pid: str):
        self.path, self.pid = path, pid
        super().__init__(f"{path.parent} is in use by another bonsai process (pid {pid or 'unknown'})")


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunLocked(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str | None:
        """The pid holding the lock, or None, without taking it (so a status query never
        makes a starting run fail).  Reads /proc/locks; elsewhere probes and lets go."""
        if not self.path.is_file():
            return None
        locks = Path("/proc/locks")
        if locks.is_file():
            stat = os.stat(self.path)
            target = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
            for line in locks.read_text().splitlines():
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == target:
                    return fields[4]
            return None
        try:
            self.acquire()
        except RunLocked as exc:
            return exc.pid or "?"
        self.release()
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
