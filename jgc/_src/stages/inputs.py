"""The inputs a check is given, before anything is evaluated: promoted, or refused.

* Promotion. Under x64 the checked parameters are evaluated in float64, and floating-point
  arguments (a float32 batch X) are promoted with them, so that the loss sees one dtype (JAX
  refuses, for example, a float64 kernel with a float32 image in a convolution).
* Refusals. Tracers (a check called inside jax.jit, grad or vmap) and deleted or donated arrays
  get an InputError naming the leaf, before any work.
"""

from __future__ import annotations

import jax
import numpy as np

from jgc._src.stages.split import InputError

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
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):  # a typed PRNG key: as it is
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
