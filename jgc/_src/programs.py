"""Compiled programs that are reused only for a provably identical function.

A check must evaluate the loss *as it is at call time*. Keying compiled code on the function
object (as `jax.jit` with a static argument does) reuses a stale trace when the loss reads a global
or a closed-over array that has changed since. jgc therefore traces the user's function on every
check (cheap next to compiling) and reuses a compiled program only when the new trace is
structurally identical to the one it was compiled from:

  * the jaxpr's text (every primitive, shape, dtype, literal value and printable parameter; JAX
    prints literals with full round-trip precision), and
  * every parameter object the text cannot show (custom_jvp/custom_vjp rules, callbacks, meshes),
    compared with their own equality: JAX's `WrappedFun` compares the wrapped Python function by
    identity, so a redefined rule is a different program, and
  * the shapes, dtypes and shardings of the inputs, and the devices.

Constants that the trace captured (closed-over arrays) are passed to the compiled program as
runtime arguments, so new values in the same shapes reuse the program and are never stale.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import jax
import jax.extend.core
import numpy as np
from jax.experimental import multihost_utils

CACHE_SIZE = 64  # compiled programs kept; each holds an XLA executable (and its rules alive)
_ATOMS = (int, float, bool, str, bytes, type(None), np.dtype, np.generic)


def _param_objects(value, out: list) -> bool:
    """Appends the parts of a jaxpr parameter that its printed text may not identify.

    Returns False when a part can be neither printed faithfully nor compared (unhashable):
    such a jaxpr is never reused.
    """
    if isinstance(value, _ATOMS):
        return True
    if isinstance(value, (tuple, list)):
        return all(_param_objects(v, out) for v in value)
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return _collect(value.jaxpr, out)
    if isinstance(value, jax.extend.core.Jaxpr):
        return _collect(value, out)
    try:
        hash(value)
    except TypeError:
        return False
    out.append(value)
    return True


def _collect(jaxpr, out: list) -> bool:
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            if not _param_objects(value, out):
                return False
    return True


def jaxpr_key(closed) -> Hashable | None:
    """A key equal for two traces exactly when they are the same program; None: never reuse."""
    objects: list = []
    if not _collect(closed.jaxpr, objects):
        return None
    consts = tuple(_aval_key(c) for c in closed.consts)
    return (str(closed.jaxpr), tuple(objects), consts)


def _aval_key(x) -> Hashable:
    return (np.shape(x), str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype),
            getattr(x, "sharding", None) if isinstance(x, jax.Array) else None)


@dataclasses.dataclass(frozen=True)
class Traced:
    """A user function traced once: its closed jaxpr, output tree and structural key."""

    closed: Any  # jax.extend.core.ClosedJaxpr
    out_tree: Any
    key: Hashable | None

    @property
    def consts(self) -> list:
        return list(self.closed.consts)

    def evaluate(self, consts, *args):
        """Evaluates the traced function (inside a program being traced); flat outputs."""
        return jax.core.eval_jaxpr(self.closed.jaxpr, consts, *args)


_paused = {"count": 0, "was_enabled": False}
_paused_lock = threading.Lock()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while jgc traces, lowers or compiles a program (on
    any thread); back on, if it was on, when the last of them finishes or raises.

    Tracing and lowering allocate objects in bursts, and a burst triggers full (generation-2)
    collections, each of which walks every object the process holds: JAX's import alone is
    ~120k objects, ~60 ms a walk on this machine. W1's first check in a fresh process ran two
    of them (0.12 s of its 0.28 s), and they freed almost nothing: reference counting frees
    tracing's garbage. Only tracing and compiling are covered: the user's own Python code run
    on the host (a NumPy loss or gradient) keeps the collector, since a from-scratch autograd's
    graph nodes are reference cycles that only it frees. Paused for a whole check, a
    micrograd-style loss of 320 parameters held 4.3 GB at its peak instead of 0.19 GB.
    """
    with _paused_lock:
        if _paused["count"] == 0:
            _paused["was_enabled"] = gc.isenabled()
            gc.disable()
        _paused["count"] += 1
    try:
        yield
    finally:
        with _paused_lock:
            _paused["count"] -= 1
            if _paused["count"] == 0 and _paused["was_enabled"]:
                gc.enable()


def trace(fn: Callable, *example_args) -> Traced:
    """Traces fn(*example_args) (arrays or ShapeDtypeStructs) into a closed jaxpr."""
    with collector_paused():
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    _, out_tree = jax.tree_util.tree_flatten(shapes)
    return Traced(closed, out_tree, jaxpr_key(closed))


class _Cache:
    """A small LRU of compiled executables, shared by every check in the process."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()
        self.compiles = 0  # programs compiled so far (tests count these)

    def get(self, key):
        with self.lock:
            if key is None or key not in self.entries:
                return None
            self.entries.move_to_end(key)
            return self.entries[key]

    def put(self, key, value) -> None:
        with self.lock:
            self.compiles += 1
            if key is None:
                return
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


CACHE = _Cache(CACHE_SIZE)


# Lighter XLA compilation for programs whose whole execution is small: on a tiny check most of
# the time is XLA's CPU backend compiling code that then runs for microseconds. Per program (no
# environment variables): optimisation level 0 without LLVM's expensive passes, and XLA's
# classic elemental emitter for fused loops instead of its newer MLIR fusion emitters. Measured
# on W1's two programs (benchmarks/cold_start.py --compile-options): compile 94 + 73 ms fully
# optimised, 86 + 74 ms with the first two options, 43 + 29 ms with all three, while the code
# runs up to ~2.5x slower. That pays only while the program's execution stays small next to the
# time saved. LIGHT_WORK is the switch point, in the work units of structured._cost
# (multiply-adds of contractions, elements elsewhere) summed over every evaluation the program
# is expected to run; measured with benchmarks/cold_start.py --light-sweep (README, "Cold
# start"). Both emitters implement the same HLO; results may differ in the last bits of
# transcendental functions, as between any two XLA versions, which the error model's rounding
# bounds already allow for.
LIGHT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}
LIGHT_WORK = 1e9


def light(work: float | None) -> bool:
    """Compile with LIGHT_OPTIONS? `work`: the program's predicted total work (None: unknown,
    so fully optimised). JGC_XLA_LIGHT=1 or 0 forces it either way (for measurements)."""
    forced = os.environ.get("JGC_XLA_LIGHT", "")
    if forced in ("0", "1"):
        return forced == "1"
    return work is not None and work <= LIGHT_WORK


def compiled(name: str, build: Callable[[], Callable], static: Hashable,
             traced: tuple[Traced, ...], args: tuple, work: float | None = None) -> Callable:
    """The compiled program `build()` for these arguments, from the cache when provably equal.

    `build()` returns a function of `args` (a flat tuple of arrays) that evaluates the traced
    user functions in `traced`; `static` is everything else that shapes the program (jgc's own
    choices: chunk sizes, which leaf is batched). A traced function whose key is None (a
    parameter that cannot be compared) makes the program single-use. `work`: the program's
    predicted total work over the check, which decides the XLA options (`light`).
    """
    keys = tuple(t.key for t in traced)
    options = LIGHT_OPTIONS if light(work) else None
    key = None
    if all(k is not None for k in keys):
        key = (name, static, keys, tuple(_aval_key(a) for a in jax.tree_util.tree_leaves(args)),
               tuple(d.id for d in jax.devices()), options is not None)
    program = CACHE.get(key)
    if program is None:
        with collector_paused():
            program = jax.jit(build()).lower(*args).compile(compiler_options=options)
        CACHE.put(key, program)
    return program


def to_host(x) -> np.ndarray:
    """A program's output as a NumPy array on this process.

    Under `jax.distributed` (every process runs the same check, SPMD) a batch sharded over the
    global devices has shards on other processes: they are gathered, so that every process holds
    the same values. This is a collective, reached by every process in the same order because
    each runs the same check. On one process it is `np.asarray`.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:  # every process holds all of it: no collective needed
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def multiprocess() -> bool:
    """Running under jax.distributed with more than one process."""
    return jax.process_count() > 1


def process_min(value: float) -> float:
    """The smallest of every process's `value` (a collective under jax.distributed)."""
    if not multiprocess():
        return value
    return float(np.min(multihost_utils.process_allgather(np.array([value], np.float64))))


def from_process_0(values: list) -> list:
    """Process 0's `values` on every process (a collective under jax.distributed), as floats."""
    if not multiprocess():
        return values
    return multihost_utils.broadcast_one_to_all(np.array(values, np.float64)).tolist()
