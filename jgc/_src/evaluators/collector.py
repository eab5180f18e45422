"""Python's garbage collector paused while jgc traces, lowers or compiles, on any thread.

The one piece of process-wide state jgc changes: generation 0's threshold. `COLLECTOR` holds the
paused sections under a lock and restores the user's thresholds when the last one ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from collections.abc import Iterator


class _Pause:
    """A token per paused section: the pause lasts while any is alive (see `collector_paused`)."""


class _Collector:
    """The pauses of Python's automatic garbage collection, across threads.

    Automatic collection is paused by setting generation 0's threshold to 0 (which disables
    automatic collection, as documented for `gc.set_threshold`), not with `gc.disable()`: the
    collector stays enabled, so a user who calls `gc.disable()` or `gc.enable()` meanwhile (on
    another thread) keeps what they asked for, and `gc.collect()` still works. The thresholds
    found by the first pause are restored when the last one ends.

    Every state change is made inside the `try` that undoes it, in an order that leaves a
    consistent state wherever an exception (a Ctrl-C) lands: a section registers before it
    pauses, restores before it unregisters, and is held in a WeakSet, so a section that could
    not unregister vanishes with its frame instead of holding the pause forever.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._sections: weakref.WeakSet[_Pause] = weakref.WeakSet()
        self._saved: tuple[int, ...] | None = None

    def pause(self, section: _Pause) -> None:
        with self._lock:
            self._sections.add(section)
            if self._saved is None:
                saved = gc.get_threshold()
                if saved[0] != 0:  # automatic collection already off: nothing to restore
                    self._saved = saved
                    gc.set_threshold(0, *saved[1:])

    def resume(self, section: _Pause) -> None:
        with self._lock:
            if section not in self._sections:
                return
            if len(self._sections) == 1 and self._saved is not None:
                gc.set_threshold(*self._saved)
                self._saved = None
            self._sections.discard(section)


COLLECTOR = _Collector()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's automatic garbage collection paused while jgc traces, lowers or compiles a
    program (on any thread); resumed when the last of them finishes or raises (`_Collector`).

    Tracing and lowering allocate objects in bursts, and a burst triggers full (generation-2)
    collections, each of which walks every object the process holds: JAX's import alone is
    ~120k objects, ~60 ms a walk on this machine. W1's first check in a fresh process ran two
    of them (0.12 s of its 0.28 s), and they freed almost nothing: reference counting frees
    tracing's garbage. Only tracing and compiling are covered: the user's own Python code run
    on the host (a NumPy loss or gradient) keeps the collector, since a from-scratch autograd's
    graph nodes are reference cycles that only it frees. Paused for a whole check, a
    micrograd-style loss of 320 parameters held 4.3 GB at its peak instead of 0.19 GB.
    """
    section = _Pause()
    try:
        COLLECTOR.pause(section)
        yield
    finally:
        COLLECTOR.resume(section)
