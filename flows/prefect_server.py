"""The temporary Prefect server a command uses when no server is configured.

Prefect starts one on first use (its "ephemeral" server): it imports the whole server stack
into the command's own process first (seconds of CPU under the same interpreter lock as the
command's own imports), then starts a uvicorn child that outlives a SIGKILLed parent, so every
killed run would leave a server behind, holding a port and memory.  This starts the same
uvicorn app directly, as the command's first act and without importing Prefect, so that its
start (12-15 s on two cores, mostly the child's imports) runs on the other core while the
command imports torch and loads the model; the Linux parent-death signal set in the child ends
the server when the command ends, however it ends.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PORT_IN_USE = 3  # uvicorn's exit status when its port was taken between choosing and binding

# A temporary server serves one command's flow runs: nothing schedules, cancels, reschedules or
# triggers anything on it, so its background services only cost CPU beside the run.
QUIET_SERVICES = (
    "CANCELLATION_CLEANUP",
    "FOREMAN",
    "LATE_RUNS",
    "SCHEDULER",
    "PAUSE_EXPIRATIONS",
    "REPOSSESSOR",
    "CLEANUP_RECONCILER",
    "TRIGGERS",
)


def _end_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """One uvicorn child serving Prefect's API app, as Prefect's own temporary server runs it
    (no UI, ephemeral database settings).  Start it from the main thread: the parent-death
    signal follows the thread that started the child."""

    def __init__(self) -> None:
        for service in QUIET_SERVICES:
            os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._spawn()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> None:
        self.port = _free_port()
        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent  # without importing it
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory"]
        command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(
            command, env=env, preexec_fn=functools.partial(_end_with_parent, os.getpid()), stdin=subprocess.DEVNULL
        )

    def wait_until_ready(self, timeout: float) -> str:
        """Poll the health endpoint; a port taken meanwhile gets a new one.  Returns the API url."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == _PORT_IN_USE:
                self._spawn()
                continue
            if status is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {status} while starting")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.api_url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
