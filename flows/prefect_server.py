"""The temporary Prefect server a command uses when no server is configured.

Prefect starts one on first use (its "ephemeral" server) as a child process that outlives a
SIGKILLed parent, so every killed run would leave a server behind, holding a port and
memory, for as long as the machine stays up.  This starts the same server, with the Linux
parent-death signal set in the child: the server ends when the command ends, however it ends.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _end_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


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


def start_temporary_server(background: bool = False) -> Callable[[], None]:
    """Start the server and point this process (and its children) at it.  Returns a function
    that waits until it answers: with ``background``, the start (12-15 s on two cores) runs in a
    thread, so the caller can do useful work meanwhile and call it before the first flow."""
    for service in QUIET_SERVICES:
        os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")
    if not background:
        _start()
        return lambda: None
    failure: list[BaseException] = []
    started = threading.Event()
    thread = threading.Thread(target=lambda: _start_and_stay(started, failure), name="prefect-server", daemon=True)
    thread.start()

    def ready() -> None:
        started.wait()
        if failure:
            raise failure[0]

    return ready


def _start_and_stay(started: threading.Event, failure: list) -> None:
    """Start the server, then keep this thread alive for as long as the process: the parent-death
    signal is sent when the thread that started the child ends, not the process, so a thread
    that returned would take the server down with it."""
    try:
        _start()
    except BaseException as exc:  # handed to the thread that waits
        failure.append(exc)
        started.set()
        return
    started.set()
    threading.Event().wait()


def _start() -> str:
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            if not sys.platform.startswith("linux"):
                return super()._run_uvicorn_command()
            popen = subprocess.Popen
            subprocess.Popen = functools.partial(popen, preexec_fn=functools.partial(_end_with_parent, os.getpid()))
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    server = TiedServer()
    server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url
