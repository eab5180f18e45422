"""Progress bars for long checks: tqdm (`tqdm.auto`, so terminals and notebooks alike) when it
is installed (`pip install 'jgc[progress]'`), else one plain line on stderr.

A bar appears only once a batch has run for SHOW_AFTER seconds (tqdm's `delay`), so short checks
print nothing. It is off with progress=False, and by default (progress=None) when stderr is not
a terminal and no notebook kernel is running: logs and CI output stay clean.
"""

from __future__ import annotations

import sys
import time

import jax

SHOW_AFTER = 2.0  # seconds: a batch that finishes sooner shows no bar


def in_notebook() -> bool:
    try:
        from IPython import get_ipython  # noqa: PLC0415 - optional, present in notebooks
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def enabled(progress: bool | None) -> bool:
    """progress=None: bars in a notebook or on a terminal, and under jax.distributed only on
    process 0 (every process runs the same check)."""
    if progress is not None:
        return bool(progress)
    if jax.process_index() != 0:
        return False
    return in_notebook() or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class Progress:
    """Factory of per-batch bars: `start(total)` returns an object with update(n) and close()."""

    def __init__(self, label: str = "jgc", show_after: float | None = None, stream=None,
                 plain: bool = False):
        self.label, self.stream, self.plain = label, stream, plain
        self.show_after = SHOW_AFTER if show_after is None else show_after

    def start(self, total: int):
        stream = self.stream or sys.stderr
        try:
            if self.plain:
                raise ImportError
            from tqdm.auto import tqdm  # noqa: PLC0415 - the optional extra
        except ImportError:
            return _PlainBar(total, self.label, self.show_after, stream)
        return tqdm(total=total, desc=self.label, unit="eval", delay=self.show_after,
                    leave=False, file=stream)


def progress_factory(progress: bool | None) -> Progress | None:
    return Progress() if enabled(progress) else None


class _PlainBar:
    """Without tqdm: one line on stderr, redrawn at most twice a second after SHOW_AFTER."""

    def __init__(self, total: int, label: str, show_after: float, stream):
        self.total, self.label, self.show_after, self.stream = total, label, show_after, stream
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.t0 >= self.show_after and (now - self.last >= 0.5
                                                  or self.done >= self.total):
            self.last = now
            self.stream.write(f"\r{self.label}: {self.done}/{self.total} evaluations, "
                              f"{now - self.t0:.0f} s")
            self.stream.flush()

    def close(self) -> None:
        if self.last:
            self.stream.write("\n")
