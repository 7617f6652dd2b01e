"""Progress of a long CLI step (``eval``, ``quantize``, ``bench``), without a dependency.

In a terminal: one live line redrawn in place (bar, done/total, rate, ETA), like tqdm.
Elsewhere (logs, CI, pipes): a plain line every ``interval_s`` seconds and one at the end, so a
log shows that the step is alive without a line per image.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """``Progress(desc, total)``; call it as ``p(done, total)`` (the callback form of
    :func:`raydetect.evaluate.evaluate`) or ``p.update(n)``; ``close()`` (or the ``with`` block)
    writes the final line."""

    BAR = 24

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "images",
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval_s: float = 10.0,
        redraw_s: float = 0.2,
        clock=time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.interval_s = interval_s
        self.redraw_s = redraw_s
        self.clock = clock
        self.t0 = clock()
        self.done = 0
        self.last = self.t0  # of the last line written
        self.closed = False
        self.drawn = False

    # -- updates --------------------------------------------------------------------------------
    def __call__(self, done: int, total: int | None = None) -> None:
        self.update_to(done, total)

    def update(self, n: int = 1) -> None:
        self.update_to(self.done + n)

    def update_to(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.done = done
        now = self.clock()
        if self.tty:
            if now - self.last >= self.redraw_s or (self.total is not None and done >= self.total):
                self._draw(now)
        elif now - self.last >= self.interval_s:
            self._line(self.status(now))
            self.last = now

    def write(self, line: str, stream: TextIO | None = None) -> None:
        """Print ``line`` (e.g. a result) without breaking the live bar."""
        if self.tty and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        print(line, file=stream or sys.stdout, flush=True)
        if self.tty and self.drawn:
            self._draw(self.clock())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        final = f"{self.desc}: {self.done}{of} {self.unit} in {elapsed:.1f} s ({rate:.1f} {self.unit}/s)"
        if self.tty:
            self.stream.write("\r\x1b[K" + final + "\n")
            self.stream.flush()
        else:
            self._line(final)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- text -----------------------------------------------------------------------------------
    def status(self, now: float | None = None) -> str:
        """``desc: 120/800 images (15%), 13.2 images/s, ETA 0:51`` (no total: count and rate)."""
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s, "
                    f"ETA {eta}")
        return f"{self.desc}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s, {_clock(elapsed)} elapsed"

    def bar(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if not self.total:
            return f"{self.desc}: {self.done} {self.unit} [{_clock(elapsed)}, {rate:.1f} {self.unit}/s]"
        frac = min(1.0, self.done / self.total)
        full = int(frac * self.BAR)
        bar = "█" * full + ("▌" if frac * self.BAR - full >= 0.5 else "")
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.desc}: {frac * 100:3.0f}%|{bar:<{self.BAR}}| {self.done}/{self.total} {self.unit} "
                f"[{_clock(elapsed)}<{eta}, {rate:.1f} {self.unit}/s]")

    def _draw(self, now: float) -> None:
        self.stream.write("\r\x1b[K" + self.bar(now))
        self.stream.flush()
        self.drawn = True
        self.last = now

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
