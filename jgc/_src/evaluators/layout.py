"""How a check's (params, args) are rebuilt from one flat vector of the checked entries, and
what a traced function's output must be (a real scalar loss, or arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.stages.split import InputError, Split, merge_parts, tree_pformat


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


# -- how (params, args) are rebuilt from the flat vector ------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of (params, args) comes from when the function is called."""

    params_def: Any
    args_def: Any
    # One (leaf index, start, stop, real-view shape, dtype, complex) per checked leaf.
    checked: tuple[tuple[int, int, int, tuple[int, ...], str, bool], ...]
    params_static: tuple[tuple[int, Any], ...]  # non-array leaves, passed as they are
    params_dynamic: tuple[int, ...]  # fixed array leaves of params
    args_static: tuple[tuple[int, Any], ...]
    args_dynamic: tuple[int, ...]
    n_params_leaves: int
    n_args_leaves: int


def make_layout(sp: Split, dtypes, args) -> tuple[Layout, tuple]:
    """Returns the layout and the fixed array leaves of params and args."""
    checked = tuple(
        (i, sp.offsets[k], sp.offsets[k + 1], sp.specs[i].view_shape, str(dtypes[k]),
         sp.specs[i].is_complex)
        for k, i in enumerate(sp.checked))
    fixed = [i for i in range(len(sp.leaves)) if i not in set(sp.checked)]
    p_dyn = tuple(i for i in fixed if _is_array(sp.leaves[i]))
    p_static = tuple((i, sp.leaves[i]) for i in fixed if i not in set(p_dyn))
    a_leaves, a_def = jax.tree_util.tree_flatten(args)
    a_dyn = tuple(i for i, x in enumerate(a_leaves) if _is_array(x))
    a_static = tuple((i, x) for i, x in enumerate(a_leaves) if not _is_array(x))
    layout = Layout(sp.treedef, a_def, checked, p_static, p_dyn, a_static, a_dyn,
                    len(sp.leaves), len(a_leaves))
    dynamic = (tuple(sp.leaves[i] for i in p_dyn), tuple(a_leaves[i] for i in a_dyn))
    return layout, dynamic


def assemble(layout: Layout, segments, dynamic, xp=jnp, cast: bool = True):
    """Rebuilds (params, args) from one flat segment per checked leaf and the fixed leaves.

    `cast`: convert each segment to its leaf's evaluation dtype (segments cut from the flat
    vector theta, which holds every leaf in one dtype); traced segments already have theirs.
    A complex leaf's segment is its real view, rebuilt into the complex array the function sees.
    """
    p_dyn, a_dyn = dynamic
    leaves: list[Any] = [None] * layout.n_params_leaves
    for seg, (i, _, _, shape, dt, is_complex) in zip(segments, layout.checked):
        leaves[i] = xp.reshape(seg, shape)
        if cast:
            leaves[i] = leaves[i].astype(dt)
        if is_complex:
            leaves[i] = merge_parts(xp, leaves[i])
    for i, value in layout.params_static:
        leaves[i] = value
    for i, x in zip(layout.params_dynamic, p_dyn):
        leaves[i] = x
    params = jax.tree_util.tree_unflatten(layout.params_def, leaves)
    a_leaves: list[Any] = [None] * layout.n_args_leaves
    for i, value in layout.args_static:
        a_leaves[i] = value
    for i, x in zip(layout.args_dynamic, a_dyn):
        a_leaves[i] = x
    return params, jax.tree_util.tree_unflatten(layout.args_def, a_leaves)


def segments_of(layout: Layout, theta) -> list:
    return [theta[a:b] for _, a, b, *_ in layout.checked]


# -- the function's output --------------------------------------------------------------------

def loss_value(out, has_aux: bool):
    """The scalar of loss(...)'s output: out, or out[0] with has_aux (as jax.value_and_grad)."""
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise InputError(
                f"has_aux=True: loss must return a pair (value, aux), as for "
                f"jax.value_and_grad(..., has_aux=True), but it returned "
                f"{_describe_out(out)}. Pass has_aux=False if it returns the value alone.")
        return out[0]
    if isinstance(out, (tuple, list)):
        raise InputError(
            f"loss returned {_describe_out(out)}, not a scalar. If it returns (value, aux), "
            "as written for jax.value_and_grad(..., has_aux=True), pass has_aux=True "
            "(`jgc check --has-aux` on the command line).")
    return out


def _describe_out(out) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of length {len(out)}: {tree_pformat(out)}"
    return f"a {type(out).__name__}"


def check_scalar(shape, dtype) -> None:
    if tuple(shape) not in ((), (1,)):
        raise InputError(
            f"loss must return a scalar, but it returned an array of shape {tuple(shape)}. "
            "Reduce it to one number, e.g. with .mean() or .sum() over the batch.")
    if np.issubdtype(np.dtype(dtype), np.complexfloating):
        raise InputError(
            f"loss must return a real scalar, but it returned a complex one ({np.dtype(dtype)}). "
            "A gradient (and jax.grad) needs a real-valued loss: return a real quantity such "
            "as jnp.abs(z) ** 2 or z.real. To check the derivative rules of a complex-valued "
            "function, use jgc.check_vjp (complex cotangents) or jgc.check_jvp.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(f"loss must return a real floating-point scalar, but it returned "
                         f"dtype {np.dtype(dtype)}. Return a float loss.")


# -- batched programs over the single trace -------------------------------------------------


def _copy_arrays(tree):
    """NumPy copies of the array leaves, so a host function cannot mutate the user's arrays. A
    typed PRNG key has no NumPy form: it is passed as it is (JAX arrays are immutable)."""
    def copy(x):
        if not _is_array(x) or jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            return x
        return np.array(x)

    return jax.tree_util.tree_map(copy, tree)

def as_traced(fn: Callable, vector: bool, has_aux: bool) -> Callable:
    """The function as traced: a loss's scalar (aux dropped), or a vector function's outputs
    (flattened into one vector by the programs)."""
    if vector:
        return fn
    return lambda *a: loss_value(fn(*a), has_aux)
