"""The demo's progress bar and result table, drawn by hand on a text stream.

On a terminal the bar is redrawn in place (at most ten times a second) and
fitted to the terminal's width; elsewhere (a pipe, a file) only its final
line is printed, so logs stay clean.  Block and box-drawing characters are
used when the stream's encoding is UTF-8, ASCII otherwise.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from typing import TextIO


def unicode_ok(stream: TextIO) -> bool:
    """Whether ``stream`` encodes UTF-8 (block and box characters)."""
    enc = (getattr(stream, "encoding", None) or "ascii").lower().replace("-", "")
    return enc in ("utf8", "utf_8")


def isatty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for closed or fd-less streams)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def human_size(n: int) -> str:
    """``16777216`` -> ``16 MiB``; sizes that are not whole units in bytes."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n:,} bytes"


def human_rate(per_second: float) -> str:
    """``771260.0`` -> ``771.3 k/s``."""
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f} M/s"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f} k/s"
    return f"{per_second:.0f}/s"


class Progress:
    """A one-line progress bar; on a non-terminal, only the final line."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.tty = isatty(stream)
        self.unicode = unicode_ok(stream)
        #: When the measured work began (``perf_counter``); may be moved back.
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_len = 0

    def update(self, done: int) -> None:
        """Redraw with ``done`` items (terminal only, at most every 0.1 s)."""
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._draw(done, now - self.start, final=False)

    def finish(self, done: int, elapsed: float | None = None) -> None:
        """The final line: ``done`` items in ``elapsed`` s (default: since start)."""
        if elapsed is None:
            elapsed = time.perf_counter() - self.start
        if self.tty:
            self._draw(done, elapsed, final=True)
        else:
            rate = done / elapsed if elapsed > 0 else 0.0
            print(
                f"{self.label} {done:,}/{self.total:,} in {elapsed:.2f} s "
                f"({human_rate(rate)})",
                file=self.stream, flush=True,
            )

    def _draw(self, done: int, elapsed: float, *, final: bool) -> None:
        frac = min(1.0, done / self.total) if self.total else 1.0
        rate = done / elapsed if elapsed > 0 else 0.0
        tail = (
            f" {done:,}/{self.total:,} {frac * 100:5.1f}%  {human_rate(rate)}"
            f"  {elapsed:.1f} s"
        )
        cols = shutil.get_terminal_size((80, 24)).columns
        width = max(10, min(40, cols - len(self.label) - len(tail) - 4))
        filled = int(frac * width)
        full, empty = ("█", "░") if self.unicode else ("#", "-")
        bar = full * filled + empty * (width - filled)
        text = f"{self.label} [{bar}]{tail}"
        # Pad over the remains of a longer previous line.
        shown = text.ljust(self._last_len)
        self._last_len = len(text)
        self.stream.write("\r" + shown + ("\n" if final else ""))
        self.stream.flush()


def draw_table(rows: Sequence[tuple[str, str]], stream: TextIO) -> None:
    """A two-column table of ``(key, value)`` rows; a rule below the first."""
    w1 = max(len(k) for k, _ in rows)
    w2 = max(len(v) for _, v in rows)
    if unicode_ok(stream):
        h, v, tl, tm, tr, ml, mm, mr, bl, bm, br = "─│┌┬┐├┼┤└┴┘"
    else:
        h, v, tl, tm, tr, ml, mm, mr, bl, bm, br = "-|+++++++++"
    top = f"{tl}{h * (w1 + 2)}{tm}{h * (w2 + 2)}{tr}"
    mid = f"{ml}{h * (w1 + 2)}{mm}{h * (w2 + 2)}{mr}"
    bottom = f"{bl}{h * (w1 + 2)}{bm}{h * (w2 + 2)}{br}"
    lines = [top]
    for i, (key, value) in enumerate(rows):
        lines.append(f"{v} {key.ljust(w1)} {v} {value.ljust(w2)} {v}")
        if i == 0:
            lines.append(mid)
    lines.append(bottom)
    print("\n".join(lines), file=stream, flush=True)
