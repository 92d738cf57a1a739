"""Running `bonsai` as a real subprocess against the session's Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PRUNE_SMALL = ["--sparsity", "0.5", "--prune-frac", "0.25", "--masks-per-iter", "12", "--calib-samples", "4",
               "--seq-len", "32", "--batch-size", "8", "--shard-size", "4", "--calib-pool", "32", "--cv-folds", "3"]


def env(tmp: Path, **extra: str) -> dict[str, str]:
    """A fresh PREFECT_HOME per call: the store, not Prefect's state, must carry a resume."""
    home = tmp / f"prefect-home-{len(list(tmp.glob('prefect-home-*')))}"
    home.mkdir(parents=True)
    out = {**os.environ, "PREFECT_HOME": str(home), "BONSAI_CACHE": str(tmp / "cache"), **extra}
    out.pop("BONSAI_KILL_AT", None)
    out.update(extra)
    return out


def bonsai(args: list[str], tmp: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonsai.flows.cli", *args], env=env(tmp, **extra),
                          capture_output=True, text=True, timeout=600)


def popen(args: list[str], tmp: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bonsai.flows.cli", *args], env=env(tmp, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
