"""A dependency-free progress bar for long checks, in terminals and notebooks.

It appears only once a batch is predicted to take longer than SHOW_AFTER seconds (measured from
the first chunks), so short checks print nothing. In a terminal it redraws one line on stderr
with a carriage return; in a Jupyter/Colab kernel it updates one display area in place (IPython
is always present there). It is off when progress=False, and by default (progress=None) when
stderr is not a terminal and no notebook kernel is running: logs and CI output stay clean.
"""

from __future__ import annotations

import sys
import time

SHOW_AFTER = 2.0  # seconds: a check predicted to finish sooner shows no bar
WIDTH = 30


def in_notebook() -> bool:
    try:
        from IPython import get_ipython  # noqa: PLC0415 - optional, present in notebooks
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def enabled(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return in_notebook() or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class Progress:
    """Factory of per-batch bars; `start(total)` returns a Bar."""

    def __init__(self, label: str = "jgc", stream=None, show_after: float = SHOW_AFTER):
        self.label, self.stream, self.show_after = label, stream, show_after

    def start(self, total: int) -> Bar:
        return Bar(total, self.label, self.stream, self.show_after)


class Bar:
    def __init__(self, total: int, label: str, stream, show_after: float):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream
        self.show_after = show_after
        self.t0 = time.perf_counter()
        self.shown = False
        self.handle = None

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.t0
        if not self.shown:
            rate = self.done / max(elapsed, 1e-9)
            if self.done >= self.total or (self.total - self.done) / rate < self.show_after:
                return
            self.shown = True
        self._draw(elapsed)

    def _text(self, elapsed: float) -> str:
        frac = self.done / max(self.total, 1)
        fill = int(WIDTH * frac)
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        return (f"{self.label} [{'#' * fill}{'.' * (WIDTH - fill)}] {self.done}/{self.total} "
                f"evaluations, {elapsed:.0f}s elapsed, ~{eta:.0f}s left")

    def _draw(self, elapsed: float) -> None:
        text = self._text(elapsed)
        if self.stream is None and in_notebook():
            from IPython.display import display  # noqa: PLC0415

            if self.handle is None:
                self.handle = display(text, display_id=True)
            else:
                self.handle.update(text)
            return
        stream = self.stream or sys.stderr
        stream.write("\r" + text)
        stream.flush()

    def close(self) -> None:
        if self.shown:
            self._draw(time.perf_counter() - self.t0)
            if self.handle is None:
                (self.stream or sys.stderr).write("\n")
