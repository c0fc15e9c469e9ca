"""The progress of a run: cases done / total and the time left, on one line rewritten in place when the
output is a terminal, appended to each case's line otherwise (logs, CI).

The time left is the sum over the cases still to run of the mean wall time of the cases of the same op
done so far, or, for an op not started yet, the case budget plus the mean time a case spent outside its
timing (correctness, memory) so far.

Example::

    p = Progress(["conv", "conv", "models"], case_s=3.0)
    p.done("conv", 2.5, "  aspp_os16_r6 [fp32]: cpu 1.29x (2.5 s)")   # prints '... [1/3, ~6 s left]'
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TextIO

__all__ = ["Progress", "fmt_duration"]


def fmt_duration(s: float) -> str:
    """``75`` -> ``"1 min 15 s"``, ``12.3`` -> ``"12 s"``."""
    s = max(round(s), 0)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class Progress:
    """Counts the cases of a run (``ops``: the op of each case, in run order) and estimates the time left.

    ``case_s``: the timing budget of a case (None: a ``--full`` run, no budget; the estimate then uses the
    cases done only). ``stream``/``tty``: where to print and whether it is a terminal (default: stdout's).
    """

    def __init__(self, ops: Sequence[str], case_s: float | None = None, stream: TextIO | None = None,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.left = list(ops)
        self.total = len(self.left)
        self.case_s = case_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self._seconds: dict[str, list[float]] = defaultdict(list)
        self._line = False  # a progress line is on the terminal, to be overwritten

    @property
    def n_done(self) -> int:
        return self.total - len(self.left)

    def eta_s(self) -> float | None:
        """Estimated seconds left; None before the first case is done."""
        done = [s for v in self._seconds.values() for s in v]
        if not done:
            return None
        mean_all = sum(done) / len(done)
        eta = 0.0
        for op in self.left:
            seen = self._seconds.get(op)
            eta += sum(seen) / len(seen) if seen else mean_all if self.case_s is None else max(mean_all, self.case_s)
        return eta

    def status(self) -> str:
        """``"[12/86, 3 min 05 s elapsed, ~4 min 10 s left]"``."""
        eta = self.eta_s()
        left = "" if eta is None else f", ~{fmt_duration(eta)} left"
        return f"[{self.n_done}/{self.total}, {fmt_duration(self.clock() - self.started)} elapsed{left}]"

    def skip(self, op: str, n: int) -> None:
        """``n`` cases of ``op`` will not run (a --time-limit cut)."""
        for _ in range(n):
            if op in self.left:
                self.left.remove(op)

    def print(self, line: str) -> None:
        """A line of output above the progress line (on a terminal the progress line is redrawn below)."""
        self._clear()
        print(line, file=self.stream, flush=True)
        self._draw()

    def done(self, op: str, seconds: float, line: str) -> None:
        """A case of ``op`` finished in ``seconds``; print its ``line`` and the progress."""
        if op in self.left:
            self.left.remove(op)
        self._seconds[op].append(seconds)
        self._clear()
        print(line if self.tty else f"{line} {self.status()}", file=self.stream, flush=True)
        self._draw()

    def close(self) -> None:
        """Remove the progress line (before the final table)."""
        self._clear()

    def _clear(self) -> None:
        if self.tty and self._line:
            print("\r\033[K", end="", file=self.stream, flush=True)
            self._line = False

    def _draw(self) -> None:
        if self.tty and self.left:
            print(f"\r{self.status()}", end="", file=self.stream, flush=True)
            self._line = True
