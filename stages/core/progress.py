"""Progress lines for long stages, through logging so they reach terminals, log files and
the Prefect UI alike.  Rate-limited: one line every few seconds, plus the last one."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("bonsai.progress")


class Progress:
    def __init__(self, what: str, total: int, unit: str = "items", every_s: float = 5.0):
        self.what, self.total, self.unit, self.every_s = what, max(int(total), 0), unit, every_s
        self.done = 0
        self.started = self._last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.every_s:
            self._last = now
            self._report(now)

    def _report(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = f", ~{left:.0f} s left" if self.done < self.total and left != float("inf") else ""
        log.info(
            "%s: %d/%d %s (%.0f%%), %.1f %s/s%s",
            self.what,
            self.done,
            self.total,
            self.unit,
            pct,
            rate,
            self.unit,
            eta,
        )
