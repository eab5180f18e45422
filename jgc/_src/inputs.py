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
from collections.abc import Iterator

import jax
import numpy as np

from jgc._src.tree import InputError


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
    if _is_tracer(jax.numpy.zeros(())):
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
