"""Stage 3, `evaluate`: the loss at the unperturbed and perturbed points.

The checked leaves live in one flat vector theta. A perturbation is a pair (flat index i, exact
step s); the loss at theta + s e_i is computed for a chunk of perturbations at once by one
`jit(vmap(...))` call. The perturbation is built by adding a masked step (`where(arange == i, s,
0)`), not with `theta.at[i].add(s)`: under vmap the latter lowers to a scatter, which XLA runs
several times slower on CPU. Every chunk has the same size (the last one is padded), so the whole
check compiles one function, and a second check of the same loss with the same shapes compiles
nothing: the jitted functions are module-level and keyed on the loss and a hashable layout.

A loss that JAX cannot trace (plain NumPy forward code) falls back to a loop on the host that
produces the same numbers, more slowly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.tree import InputError, Split, tree_pformat

# Perturbations per compiled call. Measured on 2 CPU cores: 32 to 64 per chunk runs best; more
# only grows the (chunk x n) perturbation matrix without improving throughput.
MAX_CHUNK = 64
# Upper bound on the (chunk x n) matrix of perturbed parameter vectors, in bytes.
CHUNK_BYTES = 256 * 2**20


class _Static:
    """Wraps a non-array leaf (a string, a callable, a Python int) as a hashable static value."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def _key(self):
        try:
            hash(self.value)
            return (type(self.value), self.value)
        except TypeError:
            return ("id", id(self.value))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key() == other._key()


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything static about a call loss(params, *args): hashable, so jit can key on it."""

    params_def: Any
    args_def: Any
    # One (leaf index, start, stop, shape, dtype) per checked leaf.
    checked: tuple[tuple[int, int, int, tuple[int, ...], str], ...]
    params_static: tuple[tuple[int, _Static], ...]
    params_dynamic: tuple[int, ...]
    args_static: tuple[tuple[int, _Static], ...]
    args_dynamic: tuple[int, ...]
    n_params_leaves: int
    n_args_leaves: int


def make_layout(sp: Split, dtypes, args) -> tuple[Layout, tuple]:
    """Returns the layout and the dynamic (array) leaves of params and args."""
    checked = tuple(
        (i, sp.offsets[k], sp.offsets[k + 1], sp.specs[i].shape, str(dtypes[k]))
        for k, i in enumerate(sp.checked))
    fixed = [i for i in range(len(sp.leaves)) if i not in set(sp.checked)]
    p_dyn = tuple(i for i in fixed if _is_array(sp.leaves[i]))
    p_static = tuple((i, _Static(sp.leaves[i])) for i in fixed if i not in set(p_dyn))
    a_leaves, a_def = jax.tree_util.tree_flatten(args)
    a_dyn = tuple(i for i, x in enumerate(a_leaves) if _is_array(x))
    a_static = tuple((i, _Static(x)) for i, x in enumerate(a_leaves) if not _is_array(x))
    layout = Layout(sp.treedef, a_def, checked, p_static, p_dyn, a_static, a_dyn,
                    len(sp.leaves), len(a_leaves))
    dynamic = (tuple(sp.leaves[i] for i in p_dyn), tuple(a_leaves[i] for i in a_dyn))
    return layout, dynamic


def assemble(layout: Layout, theta, dynamic, xp=jnp):
    """Rebuilds (params, args) from the flat vector and the dynamic leaves."""
    p_dyn, a_dyn = dynamic
    leaves: list[Any] = [None] * layout.n_params_leaves
    for i, start, stop, shape, dt in layout.checked:
        leaves[i] = xp.reshape(theta[start:stop], shape).astype(dt)
    for i, s in layout.params_static:
        leaves[i] = s.value
    for i, x in zip(layout.params_dynamic, p_dyn):
        leaves[i] = x
    params = jax.tree_util.tree_unflatten(layout.params_def, leaves)
    a_leaves: list[Any] = [None] * layout.n_args_leaves
    for i, s in layout.args_static:
        a_leaves[i] = s.value
    for i, x in zip(layout.args_dynamic, a_dyn):
        a_leaves[i] = x
    return params, jax.tree_util.tree_unflatten(layout.args_def, a_leaves)


def _scalar_loss(loss, layout, theta, dynamic):
    params, args = assemble(layout, theta, dynamic)
    return jnp.reshape(loss(params, *args), ())


@functools.partial(jax.jit, static_argnames=("loss", "layout"))
def _loss_at(theta, dynamic, *, loss, layout):
    return _scalar_loss(loss, layout, theta, dynamic)


@functools.partial(jax.jit, static_argnames=("loss", "layout"))
def _losses_at(theta, index, step, dynamic, *, loss, layout):
    """Loss at theta + step[j] * e_{index[j]} for every j: one compiled batch."""
    positions = jnp.arange(theta.shape[0])

    def one(i, s):
        return _scalar_loss(loss, layout, theta + jnp.where(positions == i, s, 0), dynamic)

    return jax.vmap(one)(index, step)


@functools.partial(jax.jit, static_argnames=("loss", "layout"))
def _autodiff_at(theta, dynamic, *, loss, layout):
    return jax.grad(_scalar_loss, argnums=2)(loss, layout, theta, dynamic)


@functools.partial(jax.jit, static_argnames=("fn", "layout"))
def _call_at(theta, dynamic, *, fn, layout):
    params, args = assemble(layout, theta, dynamic)
    return fn(params, *args)


def _copy_arrays(tree):
    """NumPy copies of the array leaves, so a host function cannot mutate the user's arrays."""
    return jax.tree_util.tree_map(lambda x: np.array(x) if _is_array(x) else x, tree)


class Evaluator:
    """Evaluates loss(params, *args) at perturbations of the checked leaves.

    Attributes:
      traceable: whether JAX can trace the loss (else every evaluation is a host loop).
      n_evaluations: loss evaluations so far (padding excluded).
      trace_error: why the loss could not be traced, when it could not.
    """

    def __init__(self, loss: Callable, sp: Split, theta: np.ndarray, dtypes, args: tuple):
        self.loss, self.sp, self.args = loss, sp, args
        self.layout, self.dynamic = make_layout(sp, dtypes, args)
        # One dtype for the flat vector: every leaf's values and steps are exact in it.
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
        self.theta_np = theta.astype(self.dtype)
        self.n_evaluations = 0
        self.trace_error: str | None = None
        self.out_dtype = np.dtype(np.float64)  # The loss's output dtype, once seen.
        self.traceable = self._probe()
        if self.traceable:
            self.theta = jnp.asarray(self.theta_np)
        else:
            self.host_args = _copy_arrays(args)
            self.host_dynamic = _copy_arrays(self.dynamic)

    def _probe(self) -> bool:
        """Traces the loss once (no compilation) and checks that it returns a scalar."""
        try:
            out = jax.eval_shape(
                lambda t, d: self.loss(*_apply(assemble(self.layout, t, d))),
                jax.ShapeDtypeStruct(self.theta_np.shape, self.dtype), self.dynamic)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - any tracing failure means: use the host loop.
            self.trace_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return False
        _check_scalar(out.shape, out.dtype)
        self.out_dtype = np.dtype(out.dtype)
        return True

    # -- single evaluations -------------------------------------------------------------------
    def at(self, theta_np: np.ndarray | None = None) -> float:
        """The loss at theta (the unperturbed point by default)."""
        self.n_evaluations += 1
        t = self.theta_np if theta_np is None else theta_np
        if self.traceable:
            return float(_loss_at(jnp.asarray(t), self.dynamic, loss=self.loss,
                                  layout=self.layout))
        return self._host(t)

    def _host(self, t: np.ndarray, where: str = "at params") -> float:
        params, args = assemble(self.layout, t, self.host_dynamic, xp=np)
        try:
            out = self.loss(params, *args)
        except Exception as e:
            raise InputError(
                f"loss(params, *args) raised {type(e).__name__}: {e}\n  {where}, with params "
                f"= {tree_pformat(params)}.\n  (JAX could not trace the loss either: "
                f"{self.trace_error})") from e
        arr = np.asarray(out)
        _check_scalar(arr.shape, arr.dtype)
        self.out_dtype = arr.dtype
        return float(arr.reshape(()))

    # -- batches ------------------------------------------------------------------------------
    def perturbed(self, index: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Loss at theta + step[j] * e_{index[j]}, for each j; returns float64 values."""
        m = len(index)
        self.n_evaluations += m
        if m == 0:
            return np.zeros(0)
        if not self.traceable:
            out = np.empty(m)
            for j in range(m):
                t = self.theta_np.copy()
                t[index[j]] += step[j]
                out[j] = self._host(t, f"while evaluating the perturbed point "
                                       f"{self.sp.locate(index[j])} {step[j]:+.3g}")
            return out
        chunk = self.chunk_size(m)
        pad = (-m) % chunk
        index = np.concatenate([index, np.zeros(pad, index.dtype)]).astype(np.int32)
        step = np.concatenate([step, np.zeros(pad)]).astype(self.dtype)
        out = []
        for s in range(0, m + pad, chunk):
            out.append(np.asarray(_losses_at(self.theta, index[s:s + chunk], step[s:s + chunk],
                                             self.dynamic, loss=self.loss, layout=self.layout)))
        return np.concatenate(out)[:m].astype(np.float64)

    def chunk_size(self, m: int) -> int:
        """Perturbations per compiled call: at most MAX_CHUNK and within CHUNK_BYTES."""
        by_memory = max(1, CHUNK_BYTES // max(1, self.theta_np.size * self.dtype.itemsize))
        chunk = min(MAX_CHUNK, by_memory)
        if m < chunk:  # Small problems: the next power of two, so few distinct shapes compile.
            chunk = 1 << (m - 1).bit_length()
        return chunk

    # -- gradients ----------------------------------------------------------------------------
    def autodiff(self) -> tuple[np.ndarray | None, str | None]:
        """jax.grad of the loss at theta, or (None, why) when it is not available."""
        if not self.traceable:
            return None, "the loss is not traceable by JAX"
        try:
            g = _autodiff_at(self.theta, self.dynamic, loss=self.loss, layout=self.layout)
        except Exception as e:  # noqa: BLE001 - report why, check the rest.
            return None, f"jax.grad failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        return np.asarray(g), None  # In its own dtype: its precision enters the error model.

    def call(self, fn: Callable) -> tuple[Any, bool]:
        """fn(params, *args) at theta: jitted when JAX can trace fn, else once on the host.

        Returns (output, jitted).
        """
        if self.traceable:
            try:
                out = _call_at(self.theta, self.dynamic, fn=fn, layout=self.layout)
                return jax.tree_util.tree_map(np.asarray, out), True
            except InputError:
                raise
            except Exception:  # noqa: BLE001 - not traceable: call it on the host below.
                pass
        dynamic = _copy_arrays(self.dynamic)
        params, args = assemble(self.layout, self.theta_np.copy(), dynamic, xp=np)
        args = _copy_arrays(args)
        return fn(params, *args), False


def _apply(params_args):
    params, args = params_args
    return (params, *args)


def _check_scalar(shape, dtype) -> None:
    if tuple(shape) not in ((), (1,)):
        raise InputError(
            f"loss must return a scalar, but it returned an array of shape {tuple(shape)}. "
            "Reduce it to one number, e.g. with .mean() or .sum() over the batch.")
    if not (np.issubdtype(np.dtype(dtype), np.floating)):
        raise InputError(f"loss must return a real floating-point scalar, but it returned "
                         f"dtype {np.dtype(dtype)}. Return a float loss.")
