"""Progress of a bulk job: a bar on a terminal (rich), periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("embedsvc.embed")

LOG_EVERY = 10.0  # seconds between log lines when stderr is not a terminal


class Progress:
    def __init__(self, total: int | None, done: int = 0, unit: str = "rows") -> None:
        self.total = total
        self.rows = done
        self.tokens = 0
        self.failed = 0
        self.unit = unit
        self.t0 = time.monotonic()
        self._start_rows = done
        self._passed = 0
        self._last_log = self.t0
        self._bar: Any = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("embedding"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("embed", total=total, completed=done, rate="")

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return (self.rows - self._start_rows) / elapsed, self.tokens / elapsed

    def advance(self, rows: int, tokens: int, failed: int = 0) -> None:
        """Rows finished (embedded or failed), with their tokens."""
        self.rows += rows
        self.tokens += tokens
        self.failed += failed
        self._show()

    def passed(self, rows: int) -> None:
        """Rows this run has put through forward passes so far: shown before their
        requests finish (a request's rows finish together, often near the end when the
        engine sorts many queued rows by length)."""
        self._passed = rows
        self._show()

    def shown(self) -> int:
        done = max(self.rows, self._start_rows + self._passed)
        return min(done, self.total) if self.total else done

    def _show(self) -> None:
        shown = self.shown()
        rows_s = (shown - self._start_rows) / max(time.monotonic() - self.t0, 1e-9)
        tokens_s = self.rates()[1]
        if self._bar is not None:
            rate = f"{rows_s:,.0f} {self.unit}/s, {tokens_s:,.0f} tokens/s"
            self._bar.update(self._task, completed=shown, rate=rate)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            of = f" of {self.total:,}" if self.total else ""
            eta = ""
            if self.total and rows_s > 0:
                eta = f", about {(self.total - shown) / rows_s:,.0f} s left"
            log.info(
                "%s %s%s embedded (%d failed): %.0f %s/s, %.0f tokens/s%s",
                f"{shown:,}",
                self.unit,
                of,
                self.failed,
                rows_s,
                self.unit,
                tokens_s,
                eta,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
