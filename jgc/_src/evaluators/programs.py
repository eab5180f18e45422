"""Compiled programs that are reused only for a provably identical function.

A check must evaluate the loss *as it is at call time*. Keying compiled code on the function
object (as `jax.jit` with a static argument does) reuses a stale trace when the loss reads a global
or a closed-over array that has changed since. jgc therefore traces the user's function on every
check (cheap next to compiling) and reuses a compiled program only when the new trace is the
same program as the one it was compiled from. The key (`jaxpr_key`) holds:

  * the jaxpr's text (every primitive, shape, dtype, literal value and printable parameter; JAX
    prints literals with full round-trip precision);
  * every parameter object the text cannot show (callbacks, meshes), compared with their own
    equality;
  * the content of every constant held *inside* the jaxpr, at any depth: a nested `jit` (a loss
    built as `jax.jit` over a closure, or calling a jitted helper that closes over an array)
    keeps its closed-over arrays in its own closed jaxpr, where they are compiled into the
    program. They are keyed by a digest of their bytes (`_digest`), so a loss rebuilt with new
    arrays of the same shapes is a new program. A constant that cannot be digested makes the
    program single-use;
  * the shapes, dtypes and shardings of the inputs, and the devices.

The constants of the top-level jaxpr (arrays the traced function closes over directly) are
passed to the compiled program as runtime arguments instead, so new values in the same shapes
reuse the program and are never stale; only their shapes enter the key.

Custom differentiation rules (the Python functions of custom_jvp and custom_vjp) are not in the
key: a program that only evaluates the function runs their primal computation, which the jaxpr
holds, and never the rules. A program that differentiates through them (jax.grad, jax.jvp of a
trace holding such a rule, `Traced.has_rules`) is keyed on its own trace instead
(`program_key`): the rules as they are traced into it now, with every constant by content. Python
functions are never compared by identity, which would miss a rule that reads a changed global.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import jax
import jax.extend.core
import numpy as np
from jax.experimental import multihost_utils

from jgc._src import compat
from jgc._src.evaluators import xla
from jgc._src.evaluators.collector import collector_paused

CACHE_SIZE = 64  # compiled programs kept; each holds an XLA executable (and its rules alive)
_ATOMS = (int, float, bool, str, bytes, type(None), np.dtype, np.generic)


# Primitives whose non-jaxpr parameters are differentiation rules (Python functions): they run
# only when the function is differentiated (see the module doc).
RULE_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


@dataclasses.dataclass
class _Collected:
    """What a jaxpr's text cannot show, gathered over every depth."""

    objects: list = dataclasses.field(default_factory=list)
    has_rules: bool = False


def _param_objects(value, out: _Collected, rule: bool = False) -> bool:
    """Appends the parts of a jaxpr parameter that its printed text may not identify.

    Returns False when a part can be neither printed faithfully nor compared (unhashable, or a
    constant whose content cannot be read): such a jaxpr is never reused. `rule`: the parameter
    belongs to a custom-rule primitive, where anything but a jaxpr is the rule itself.
    """
    if isinstance(value, _ATOMS):
        return True
    if isinstance(value, (tuple, list)):
        return all(_param_objects(v, out, rule) for v in value)
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        digests = [_digest(c) for c in value.consts]
        if any(d is None for d in digests):
            return False
        out.objects.append(tuple(digests))
        return _collect(value.jaxpr, out)
    if isinstance(value, jax.extend.core.Jaxpr):
        return _collect(value, out)
    if rule:
        out.has_rules = True
        return True
    try:
        hash(value)
    except TypeError:
        return False
    out.objects.append(value)
    return True


def _collect(jaxpr, out: _Collected) -> bool:
    for eqn in jaxpr.eqns:
        rule = eqn.primitive.name in RULE_PRIMITIVES
        for value in eqn.params.values():
            if not _param_objects(value, out, rule):
                return False
    return True


def _digest(x) -> Hashable | None:
    """A constant's shape, dtype and a digest of its bytes; None when its content cannot be
    read (a tracer, an opaque object): the program is then never reused.

    BLAKE2b runs at about 1 GB/s here, so a loss that closes a 100 MB dataset into a nested
    jit pays about 0.1 s per check for never being stale.
    """
    try:
        if isinstance(x, jax.core.Tracer):
            return None
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float64), jax.dtypes.prng_key):
            dtype, x = str(x.dtype), jax.random.key_data(x)
        else:
            dtype = None
        a = np.ascontiguousarray(np.asarray(x))
        if a.dtype == object:
            return None
        h = hashlib.blake2b(a.view(np.uint8).reshape(-1).data if a.size else b"",
                            digest_size=16)
        return (a.shape, dtype or str(a.dtype), h.hexdigest())
    except Exception:  # noqa: BLE001 - unreadable: never reuse
        return None


def jaxpr_key(closed, consts_by_content: bool = False) -> tuple[Hashable | None, bool]:
    """A key equal for two traces exactly when they are the same program (None: never reuse),
    and whether the trace holds custom differentiation rules.

    `consts_by_content`: the top-level constants are compiled in (a program's own trace), so
    their content is keyed too; otherwise they are runtime arguments and only their shapes are.
    """
    found = _Collected()
    if not _collect(closed.jaxpr, found):
        return None, found.has_rules
    if consts_by_content:
        consts = tuple(_digest(c) for c in closed.consts)
        if any(d is None for d in consts):
            return None, found.has_rules
    else:
        consts = tuple(_aval_key(c) for c in closed.consts)
    return (str(closed.jaxpr), tuple(found.objects), consts), found.has_rules


def _aval_key(x) -> Hashable:
    return (np.shape(x), str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype),
            getattr(x, "sharding", None) if isinstance(x, jax.Array) else None)


@dataclasses.dataclass(frozen=True)
class Traced:
    """A user function traced once: its closed jaxpr, output tree and structural key."""

    closed: Any  # jax.extend.core.ClosedJaxpr
    out_tree: Any
    key: Hashable | None
    has_rules: bool = False  # custom_jvp/custom_vjp rules, at any depth

    @property
    def consts(self) -> list:
        return list(self.closed.consts)

    def evaluate(self, consts, *args):
        """Evaluates the traced function (inside a program being traced); flat outputs."""
        return jax.core.eval_jaxpr(self.closed.jaxpr, consts, *args)


def thread_config() -> tuple[bool, str, str]:
    """This thread's JAX settings that a check's worker threads must share: x64 and the two
    numpy promotion modes. JAX's context managers (jax.enable_x64, jax.numpy_rank_promotion,
    jax.numpy_dtype_promotion) set them per thread, so a worker would see the global values
    instead: a user's `with jax.numpy_rank_promotion("raise"):` would not hold for the gradient
    function traced there, nor for the programs compiled there."""
    return (bool(jax.config.jax_enable_x64), jax.config.jax_numpy_rank_promotion,
            jax.config.jax_numpy_dtype_promotion)


@contextlib.contextmanager
def configured(config: tuple[bool, str, str]) -> Iterator[None]:
    """The block under `config` (another thread's `thread_config()`), restored afterwards."""
    x64, rank, dtype = config
    with compat.enable_x64(x64), jax.numpy_rank_promotion(rank), jax.numpy_dtype_promotion(dtype):
        yield


def trace(fn: Callable, *example_args) -> Traced:
    """Traces fn(*example_args) (arrays or ShapeDtypeStructs) into a closed jaxpr."""
    with collector_paused():
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    _, out_tree = jax.tree_util.tree_flatten(shapes)
    return Traced(closed, out_tree, *jaxpr_key(closed))


def program_key(build: Callable[[], Callable], args: tuple) -> Hashable | None:
    """A program keyed on its own trace: its jaxpr, with every constant (top-level ones
    included, which it compiles in) by content. What it compiles is exactly what it keys."""
    with collector_paused():
        closed = jax.make_jaxpr(build())(*args)
    if any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        # A rule closed over a value of a tracing pass that has ended (a custom_jvp's
        # nondiff argument): this program cannot run, so it is not compiled either.
        raise LeakedTracer("a custom rule holds a tracer of an earlier trace")
    return jaxpr_key(closed, consts_by_content=True)[0]


class LeakedTracer(RuntimeError):
    """A program's trace captured a tracer of an earlier, finished trace."""


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


def compiled(name: str, build: Callable[[], Callable], static: Hashable,
             traced: tuple[Traced, ...], args: tuple, work: float | None = None, *,
             by_program: bool = False, forced_light: bool | None = None) -> Callable:
    """The compiled program `build()` for these arguments, from the cache when provably equal.

    `build()` returns a function of `args` (a flat tuple of arrays) that evaluates the traced
    user functions in `traced`; `static` is everything else that shapes the program (jgc's own
    choices: chunk sizes, which leaf is batched). A traced function whose key is None (a
    parameter that cannot be compared) makes the program single-use. `work`: the program's
    predicted total work over the check, which decides the XLA options (`light`).

    `by_program`: key the program on its own trace (`program_key`) instead of the user traces'
    keys: for a program that differentiates through custom rules (`Traced.has_rules`), or that
    traces the user's function afresh, since neither is shown by the user trace's key.

    `forced_light`: compile with the light XLA options (True) or without (False) whatever the
    work, for measurements only (benchmarks/cold_start.py); None lets the work decide.
    """
    options = xla.LIGHT_OPTIONS if xla.light(work, forced_light) else None
    if by_program:
        keys = (program_key(build, args),)
    else:
        keys = tuple(t.key for t in traced)
    key = None
    if all(k is not None for k in keys):
        key = (name, static, keys, tuple(_aval_key(a) for a in jax.tree_util.tree_leaves(args)),
               tuple(d.id for d in jax.devices()), options is not None)
    program = CACHE.get(key)
    if program is None:
        with collector_paused():
            lowered = jax.jit(build()).lower(*args)
            if options is not None and forced_light is None and not xla.light(
                    work * xla.slowdown(lowered.as_text())):
                options = None
            program = lowered.compile(compiler_options=options)
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
