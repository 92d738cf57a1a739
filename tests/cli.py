"""Running `bonsai` as a real subprocess against the session's Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny import SMALL

# the same settings as tiny.SMALL, as `bonsai prune` flags
PRUNE_SMALL = [item for key, value in SMALL.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def env(tmp: Path, **extra: str) -> dict[str, str]:
    """A fresh PREFECT_HOME per call: the store, not Prefect's state, must carry a resume."""
    home = tmp / f"prefect-home-{len(list(tmp.glob('prefect-home-*')))}"
    home.mkdir(parents=True)
    out = {**os.environ, "PREFECT_HOME": str(home), "BONSAI_CACHE": str(tmp / "cache"), **extra}
    out.pop("BONSAI_KILL_AT", None)
    out.update(extra)
    return out


def bonsai(args: list[str], tmp: Path, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonsai.flows.cli", *args], env=env(tmp, **extra),
                          capture_output=True, text=True, timeout=timeout)


def popen(args: list[str], tmp: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bonsai.flows.cli", *args], env=env(tmp, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
