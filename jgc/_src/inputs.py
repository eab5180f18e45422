"""What a check is given, before anything is evaluated: precision, and inputs jgc cannot use.

* Precision. `x64=True` evaluates in float64 and restores JAX's setting afterwards, even on
  error. JAX's x64 flag is thread-local, and jgc compiles jax.grad and the user's gradient on
  worker threads, so the *effective* flag of the calling thread is captured once and every
  thread of the check runs under it: one check, one precision.
* Promotion. Under x64 the checked parameters are evaluated in float64, and floating-point
  arguments (a float32 batch X) are promoted with them, so that the loss sees one dtype (JAX
  refuses, for example, a float64 kernel with a float32 image in a convolution).
* Refusals. Tracers (a check called inside jax.jit, grad or vmap) and deleted or donated arrays
  get an InputError naming the leaf, before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from jgc._src.tree import InputError
from jgc._src.vocab import METHOD_ADVICE, MODE_ADVICE, Method, Mode


@contextlib.contextmanager
def precision(x64: bool) -> Iterator[bool]:
    """Float64 for the duration of a check (x64=True), restored afterwards even on error.

    Yields the effective x64 flag, for `in_precision` on other threads. `jax.enable_x64` is a
    context manager over the config option: on exit it restores the value it found, whether the
    body returned or raised (KeyboardInterrupt included).
    """
    if not isinstance(x64, bool):
        raise InputError(f"x64={x64!r}: expected True (check in float64, the default) or False "
                         "(check at the parameters' own precision).")
    effective = True if x64 else bool(jax.config.jax_enable_x64)
    with jax.enable_x64(effective):
        yield effective


def in_precision(effective: bool, fn, *args):
    """fn(*args) under the check's effective x64 flag (for worker threads, which do not see
    the calling thread's setting)."""
    with jax.enable_x64(effective):
        return fn(*args)


_TRANSFORMED = (
    "jgc checks must be called outside jax.jit, jax.grad, jax.vmap and other transformations: "
    "a check evaluates the loss at many perturbed points and compares concrete numbers, which "
    "a traced value does not have. Call it at the top level of your test or script, on "
    "concrete arrays.")


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def refuse_unusable(**trees) -> None:
    """InputError for a tracer or a deleted (donated) array among the inputs, by leaf path."""
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            where = f"{name}{jax.tree_util.keystr(path)}"
            if _is_tracer(leaf):
                raise InputError(f"{where} is a JAX tracer ({type(leaf).__name__}): "
                                 + _TRANSFORMED)
            if isinstance(leaf, jax.Array) and leaf.is_deleted():
                raise InputError(
                    f"{where} is a deleted JAX array: it was donated to a jitted function "
                    "(donate_argnums) or deleted with .delete(), so its buffer is gone. Pass "
                    "the live array (the value the donating call returned), or keep a copy "
                    "before donating.")
    # A value made here is a tracer only inside a jit trace (params that are tracers were caught
    # above). device_put is a transfer, not a program: jnp.zeros(()) compiled one, ~35 ms of a
    # fresh process's first check.
    if _is_tracer(jax.device_put(0.0)):
        raise InputError("check called inside a JAX transformation: " + _TRANSFORMED)


def promote_args(args: tuple, x64: bool) -> tuple[tuple, list[str]]:
    """Floating-point array arguments in float64 (complex in complex128) under x64.

    Returns the arguments (copies where promoted; the user's arrays are untouched) and the
    paths that were promoted, with their dtypes.
    """
    if not x64:
        return args, []
    promoted: list[str] = []

    def up(path, x):
        if not isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return x
        dt = np.dtype(x.dtype)
        if jax.numpy.issubdtype(dt, np.floating) and dt != np.float64:
            target = np.float64
        elif jax.numpy.issubdtype(dt, np.complexfloating) and dt != np.complex128:
            target = np.complex128
        else:
            return x
        promoted.append(f"args{jax.tree_util.keystr(path)} ({dt})")
        return np.asarray(x).astype(target) if isinstance(x, (np.ndarray, np.generic)) else \
            x.astype(target)

    out = jax.tree_util.tree_map_with_path(up, args)
    return out, promoted


@dataclasses.dataclass(frozen=True)
class Options:
    """A check's options, validated once (see check_grad for their meaning)."""

    x64: bool = True
    mode: Mode = Mode.AUTO
    method: Method = Method.CENTRAL
    eps: float | None = None
    rtol: float | None = None
    atol: float | None = None
    samples: int = 16
    seed: int = 0
    memory_budget: int | None = None
    progress: bool | None = None
    has_aux: bool = False
    f_scale: float = 0.0  # a magnitude of the loss's terms, when known (check_vjp)
    source: str = "hand-written"  # what a gradient function is called in the report
    effective_x64: bool = True  # the x64 flag the check runs under (see `precision`)

    @property
    def user_tolerance(self) -> bool:
        """The user fixed the tolerance (rtol/atol): what passes is theirs to choose."""
        return self.rtol is not None or self.atol is not None

    @property
    def refine(self) -> bool:
        """Finer steps where a gradient is in doubt, unless the user fixed the step or the
        tolerance: their choice stands."""
        return self.eps is None and not self.user_tolerance


def make_options(**kw) -> Options:
    """Options from the user's keywords, with an InputError naming any bad one."""
    mode = Mode.parse(kw.pop("mode", "auto"), "mode", MODE_ADVICE)
    method = Method.parse(kw.pop("method", "central"), "method", METHOD_ADVICE)
    opts = Options(mode=mode, method=method, **kw)
    for name in ("rtol", "atol"):
        v = getattr(opts, name)
        if v is not None and not (np.isfinite(v) and v >= 0):
            raise InputError(f"{name}={v!r}: expected a non-negative number, or None to use the "
                             "error model.")
    if opts.eps is not None and not (np.isfinite(opts.eps) and opts.eps > 0):
        raise InputError(f"eps={opts.eps!r}: the step must be a positive finite number, or None "
                         "to choose it from each leaf's dtype and magnitude.")
    budget = opts.memory_budget
    if budget is not None and (isinstance(budget, bool) or not isinstance(
            budget, (int, float, np.integer, np.floating)) or not np.isfinite(budget)
            or budget < 1):
        raise InputError(f"memory_budget={budget!r}: expected a positive number of bytes for one "
                         "batch of perturbed evaluations (e.g. 2**30 for 1 GiB), or None for the "
                         "default (a quarter of the available memory, 256 MiB to 1 GiB).")
    samples = opts.samples
    if mode == Mode.SAMPLE and (isinstance(samples, bool) or not isinstance(
            samples, (int, np.integer)) or samples < 1):
        raise InputError(f"samples={samples!r}: mode='sample' checks `samples` entries per leaf, "
                         "so it must be a positive integer (default 16). A check of zero "
                         "entries would verify nothing.")
    return opts
