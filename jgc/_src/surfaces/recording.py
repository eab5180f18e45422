"""Records the checks made while a listener is active: what jgc's pytest plugin counts and writes.

The public surfaces (check_grad, check_vjp, check_jvp, check_hvp) are decorated with `recorded`.
Without a listener a decorated call costs one ContextVar lookup. Inside `listening()`, each
completed check adds a `Record` (the surface, its Report, its wall time) and a check that raised
adds one with its wall time and the exception's name. A check made inside another (assert_grad
calls check_grad) is part of the outer one and is not recorded again.

The listener is a ContextVar, so it follows the code that runs the test: asyncio tasks created
inside `listening()` see it, other threads do not.

>>> import jax.numpy as jnp, jgc
>>> from jgc._src.surfaces.recording import listening
>>> with listening() as recorder:
...     _ = jgc.assert_grad(lambda p: jnp.sum(p ** 2), jnp.ones(3))
>>> [(r.surface, r.report.ok) for r in recorder.records]
[('check_grad', True)]
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # importing the Report would import JAX: pytest loads this module at start-up
    from jgc._src.report.report import Report

F = TypeVar("F", bound=Callable)


@dataclasses.dataclass(frozen=True)
class Record:
    """One check made while listening.

    Attributes:
      surface: the public function called: "check_grad", "check_vjp", "check_jvp", "check_hvp".
      report: its Report; None when the check raised.
      seconds: wall time of the call.
      error: the name of the exception it raised ("InputError"), or None.
    """

    surface: str
    report: Report | None
    seconds: float
    error: str | None = None


class Recorder:
    """Collects the records of the checks made while it listens (thread-safe)."""

    def __init__(self) -> None:
        self._records: list[Record] = []
        self._lock = threading.Lock()

    def add(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> tuple[Record, ...]:
        """The records so far, in the order the checks finished."""
        with self._lock:
            return tuple(self._records)

    def take(self) -> tuple[Record, ...]:
        """The records so far, which the recorder then forgets."""
        with self._lock:
            records, self._records = tuple(self._records), []
        return records


# The active recorder; None inside a recorded check, so that a nested check is not counted twice.
_LISTENER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "jgc_listener", default=None)


@contextlib.contextmanager
def listening(recorder: Recorder | None = None) -> Iterator[Recorder]:
    """Records every check made in the block (in this context) into `recorder` (a new one by
    default), which it yields. Blocks nest: the innermost listener gets the records."""
    recorder = Recorder() if recorder is None else recorder
    token = _LISTENER.set(recorder)
    try:
        yield recorder
    finally:
        _LISTENER.reset(token)


def recorded(check: F) -> F:
    """Decorates a public check so that an active listener records each call of it."""
    surface = check.__name__

    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        recorder = _LISTENER.get()
        if recorder is None:
            return check(*args, **kwargs)
        token = _LISTENER.set(None)
        start = time.perf_counter()
        try:
            report = check(*args, **kwargs)
        except BaseException as e:
            recorder.add(Record(surface, None, time.perf_counter() - start, type(e).__name__))
            raise
        finally:
            _LISTENER.reset(token)
        recorder.add(Record(surface, report, time.perf_counter() - start))
        return report

    return wrapper  # type: ignore[return-value]
