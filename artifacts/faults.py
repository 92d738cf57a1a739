"""Named kill points, so tests can SIGKILL a real run at an exact place.

Set ``BONSAI_KILL_AT=name`` (or ``name#N`` for the N-th time the point is reached) and the
process kills itself with SIGKILL there: no cleanup handlers, no flushed buffers, the same
as a power cut.  Unset, ``kill_point`` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    target = os.environ.get("BONSAI_KILL_AT")
    if not target:
        return
    wanted, _, nth = target.partition("#")
    if wanted != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
