"""How a command reaches Prefect: its environment defaults, the configured server, or else
a temporary one, and a console that shows user errors as one line.

With no server configured, Prefect starts a temporary one on first use (its "ephemeral"
server): it imports the whole server stack into the command's own process first (seconds of
CPU under the same interpreter lock as the command's own imports), then starts a uvicorn child
that outlives a SIGKILLed parent, so every killed run would leave a server behind, holding a
port and memory.  ``TemporaryServer`` starts the same uvicorn app directly, as the command's
first act and without importing Prefect, so that its start (10-15 s on two cores, mostly the
child's imports) runs on the other core while the command imports torch and loads the model;
the Linux parent-death signal set in the child ends the server when the command ends, however
it ends.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from bonsai.stages.core.errors import UserError

PREFECT_DEFAULTS = {
    # A temporary server needs 10-15 s to start on two cores, more on a busy machine; Prefect's default is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Send the stages' own log lines (progress included) to the Prefect run logs as well.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "bonsai",
    # The stages report progress as log lines; transformers' bars would interleave with them.
    # An environment variable, so that flow runs in child processes (schedules, Dask) see it.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


_PR_SET_PDEATHSIG = 1
_PORT_IN_USE = 3  # uvicorn's exit status when its port was taken between choosing and binding (or startup failed)

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
        # The server's own output: shown only when it fails to start.  On the console it would
        # print its shutdown (events it could not record once terminated) after the command's result.
        self.log = tempfile.TemporaryFile()
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
        self.log.seek(0)
        self.log.truncate()
        self.process = subprocess.Popen(
            command,
            env=env,
            preexec_fn=functools.partial(_end_with_parent, os.getpid()),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self, lines: int = 20) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def wait_until_ready(self, timeout: float) -> str:
        """Poll the health endpoint; a port taken meanwhile gets a new one.  Returns the API url."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == _PORT_IN_USE and "address already in use" in self.log_tail().lower():
                self._spawn()
                continue
            if status is not None:
                tail = self.log_tail()
                self.stop(report=False)
                raise RuntimeError(f"the temporary Prefect server exited with status {status} while starting:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.api_url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop(report=False)
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s:\n{tail}")

    def stop(self, report: bool = True) -> None:
        """End the server; ``report``: if it ended on its own with an error, print its last lines."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if report and process.poll() not in (None, 0, _PORT_IN_USE):
            print(f"the temporary Prefect server stopped with status {process.returncode}:", file=sys.stderr)
            print(self.log_tail(), file=sys.stderr)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prefect_environment() -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


class _HideUserErrors(logging.Filter):
    """Keep Prefect's console from printing a traceback for bad input; the CLI prints the
    one-line message itself.  The Prefect UI (API log handler) still gets everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            return False
        return "UserError" not in record.getMessage()


@contextmanager
def quiet_user_errors():
    handlers = [h for name in ("", "prefect") for h in logging.getLogger(name).handlers]
    hide = _HideUserErrors()
    for handler in handlers:
        handler.addFilter(hide)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(hide)


def start_prefect(background: bool = False) -> Callable[[], None]:
    """Before a flow runs: a configured Prefect server must answer (else one clear line,
    nothing started); Prefect's logging setup (run when it is imported) owns the console and
    the stages' ``bonsai.*`` loggers propagate to it.  Returns the function to call before the
    first flow: with ``background``, a temporary server starts while the caller works."""
    prefect_environment()
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        # started before Prefect is even imported, so that its start overlaps all of ours
        server = TemporaryServer()
    url = configured_server()
    logging.getLogger("bonsai").setLevel(logging.INFO)
    if server is not None and url:  # a Prefect profile names a server after all
        server.stop()
    elif server is not None:

        def ready() -> None:
            timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
            # also handed down to Dask workers, which would otherwise each start a server of their own
            os.environ["PREFECT_API_URL"] = server.wait_until_ready(timeout)
            from prefect.context import refresh_global_settings_context

            refresh_global_settings_context()  # Prefect read its settings when it was imported
            logging.getLogger("bonsai.prefect").info("temporary Prefect server on %s", server.api_url)

        if not background:
            ready()
            return lambda: None
        return ready
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise UserError(
            f"cannot reach the Prefect server at {url} (PREFECT_API_URL: {exc.__class__.__name__}); "
            f"nothing was started and the run directory is untouched: start the server "
            f"(`prefect server start`) or unset PREFECT_API_URL to use a temporary one"
        ) from None
    return lambda: None


def configured_server() -> str | None:
    """The configured Prefect API, or None when runs would use a temporary server."""
    prefect_environment()
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None
