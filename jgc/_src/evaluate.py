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
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jgc._src.tree import InputError, Split, tree_pformat

# Perturbations per compiled call. Measured on 2 CPU cores: 32 to 64 per chunk runs best for
# large leaves; more only grows the (chunk x n) perturbation matrix. Small problems take larger
# chunks, which cuts the per-call dispatch overhead that dominates them.
MAX_CHUNK = 64
MAX_CHUNK_SMALL = 512
MIN_CHUNK = 16
MAP_BATCH = 2  # large leaves: perturbations evaluated two at a time within a chunk
SMALL_BATCHED = 4096  # "small": at most this many batched parameters per perturbation
# From this many parameters on, each leaf gets its own batched function (a compile each), so that
# computation not depending on the perturbed leaf is done once per batch instead of per
# perturbation. Below it, one function over the flat vector (a single compile) is cheaper.
PER_LEAF_MIN = 20_000


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


def assemble(layout: Layout, theta, dynamic, xp=jnp, leaf: int | None = None, value=None):
    """Rebuilds (params, args) from the flat vector and the dynamic leaves.

    With `leaf` (a checked-leaf position) the values of that leaf come from `value` instead of
    theta: under vmap only that leaf is then batched, and everything computed from the other
    leaves alone (the unperturbed front of a network) is computed once.
    """
    p_dyn, a_dyn = dynamic
    leaves: list[Any] = [None] * layout.n_params_leaves
    for k, (i, start, stop, shape, dt) in enumerate(layout.checked):
        flat = value if k == leaf else theta[start:stop]
        leaves[i] = xp.reshape(flat, shape).astype(dt)
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


def _scalar_loss(loss, layout, theta, dynamic, leaf=None, value=None):
    params, args = assemble(layout, theta, dynamic, leaf=leaf, value=value)
    return jnp.reshape(loss(params, *args), ())


def _segment(layout: Layout, theta, leaf: int | None):
    if leaf is None:
        return theta
    _, start, stop, _, _ = layout.checked[leaf]
    return theta[start:stop]


def _losses_along_bound(vectors, theta, vid, mult, lo, hi, dynamic, **static):
    return _losses_along(theta, vectors, vid, mult, lo, hi, dynamic, **static)


def _map(one, arrays, sequential: bool):
    """one(*row) over arrays shaped (devices, chunk, ...): vmapped over the devices axis (which
    is sharded across jax.devices()), and within a device either vmapped (small problems) or
    mapped sequentially in pairs (large leaves: a batched matmul whose weights differ per
    perturbation streams a fresh copy of them from memory each time, while a sequential map
    keeps one copy in cache; measured 2x faster on a 784x64 leaf)."""
    def per_device(*rows):
        if sequential:
            return jax.lax.map(lambda a: one(*a), rows, batch_size=MAP_BATCH)
        return jax.vmap(one)(*rows)

    return jax.vmap(per_device)(*arrays)


@functools.partial(jax.jit, static_argnames=("loss", "layout", "leaf", "sequential"))
def _losses_at(theta, index, step, dynamic, *, loss, layout, leaf, sequential):
    """Loss at theta + step[j] * e_{index[j]} for every j: one compiled batch.

    leaf=None: indices into the whole flat vector. Otherwise indices into that checked leaf,
    and only that leaf is batched.
    """
    base = _segment(layout, theta, leaf)
    positions = jnp.arange(base.shape[0])

    def one(i, s):
        value = base + jnp.where(positions == i, s, 0)
        if leaf is None:
            return _scalar_loss(loss, layout, value, dynamic)
        return _scalar_loss(loss, layout, theta, dynamic, leaf, value)

    return _map(one, (index, step), sequential)


@functools.partial(jax.jit, static_argnames=("loss", "layout", "leaf", "sequential"))
def _losses_along(theta, vectors, vid, mult, lo, hi, dynamic, *, loss, layout, leaf, sequential):
    """Loss with checked leaf `leaf` at x + mult[j] * vectors[vid[j]] on entries lo[j]..hi[j]-1.

    The step vectors stay on the device; a row is four numbers. mult is +-1 or a small integer
    and the mask 0 or 1, so the perturbed value is fl(x + s) for the vector's own entry s,
    exactly as the host computes it when it predicts the change.
    """
    base = _segment(layout, theta, leaf)
    positions = jnp.arange(base.shape[0])

    def one(v, c, a, b):
        mask = (positions >= a) & (positions < b)
        return _scalar_loss(loss, layout, theta, dynamic, leaf,
                            base + jnp.where(mask, c * vectors[v], 0))

    return _map(one, (vid, mult, lo, hi), sequential)


@functools.partial(jax.jit, static_argnames=("loss", "layout"))
def _losses_complex(theta, index, step, dynamic, *, loss, layout):
    """Im loss(theta + i step[j] e_{index[j]}) / step[j]: the complex-step derivatives."""
    positions = jnp.arange(theta.shape[0])

    def one(i, s):
        z = theta + 1j * jnp.where(positions == i, s, 0)
        return jnp.imag(_scalar_loss(loss, layout, z, dynamic)) / s

    return jax.vmap(one)(index, step)


@functools.partial(jax.jit, static_argnames=("fn", "layout"))
def _call_at(theta, dynamic, *, fn, layout):
    params, args = assemble(layout, theta, dynamic)
    return fn(params, *args)


@functools.partial(jax.jit, static_argnames=("loss", "layout"))
def _autodiff_at(theta, dynamic, *, loss, layout):
    return jax.grad(_scalar_loss, argnums=2)(loss, layout, theta, dynamic)


def _copy_arrays(tree):
    """NumPy copies of the array leaves, so a host function cannot mutate the user's arrays."""
    return jax.tree_util.tree_map(lambda x: np.array(x) if _is_array(x) else x, tree)


def default_memory_budget() -> int:
    """A quarter of the memory available now, between 256 MiB and 1 GiB: room for the batch of
    perturbed evaluations without crowding the user's own arrays."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * 2**30
    return int(min(max(available // 4, 256 * 2**20), 2**30))


def _activation_bytes(loss, layout, theta_shape, dtype, dynamic) -> int:
    """An upper bound on the memory one evaluation of the loss touches: the sum of every
    intermediate value's size in its jaxpr (XLA fuses and frees most of them)."""
    jaxpr = jax.make_jaxpr(lambda t, d: _scalar_loss(loss, layout, t, d))(
        jax.ShapeDtypeStruct(theta_shape, dtype), dynamic).jaxpr
    total = 0
    stack = [jaxpr]
    while stack:
        jp = stack.pop()
        for eqn in jp.eqns:
            for v in eqn.outvars:
                aval = v.aval
                if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                    total += int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize
            for param in eqn.params.values():  # inner jaxprs: pjit, scan, cond, custom rules
                for item in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        stack.append(inner)
    return total


class Evaluator:
    """Evaluates loss(params, *args) at perturbations of the checked leaves.

    Attributes:
      traceable: whether JAX can trace the loss (else every evaluation is a host loop).
      n_evaluations: loss evaluations so far (padding excluded).
      trace_error: why the loss could not be traced, when it could not.
      per_leaf: whether batches perturb one leaf at a time (large problems) or the whole
        flat vector (small ones: a single compiled function).
      chunk: perturbations per compiled call and device.
    """

    def __init__(self, loss: Callable, sp: Split, theta: np.ndarray, dtypes, args: tuple, *,
                 memory_budget: int | None = None, progress=None):
        self.loss, self.sp, self.args = loss, sp, args
        self.layout, self.dynamic = make_layout(sp, dtypes, args)
        # One dtype for the flat vector: every leaf's values and steps are exact in it.
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
        self.theta_np = theta.astype(self.dtype)
        self.n_evaluations = 0
        self.trace_error: str | None = None
        self.out_dtype = np.dtype(np.float64)  # The loss's output dtype, once seen.
        self.memory_budget = memory_budget or default_memory_budget()
        self.progress = progress
        self.traceable = self._probe()
        if self.traceable:
            self.devices = jax.devices()
            self.theta = jnp.asarray(self.theta_np)
            self.per_leaf = sp.n >= PER_LEAF_MIN and len(sp.checked) > 1
            # Activation memory matters for budgeting large problems only (a trace costs time).
            self.act_bytes = (_activation_bytes(loss, self.layout, self.theta_np.shape,
                                                self.dtype, self.dynamic)
                              if sp.n > SMALL_BATCHED else 0)
            self._sharding = None
            if len(self.devices) > 1:
                mesh = Mesh(np.array(self.devices), ("p",))
                self._sharding = NamedSharding(mesh, P("p"))
                replicated = NamedSharding(mesh, P())
                self.theta = jax.device_put(self.theta, replicated)
                self.dynamic = jax.device_put(self.dynamic, replicated)
        else:
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

    # -- memory ---------------------------------------------------------------------------------
    def bytes_per_evaluation(self, batched: int) -> int:
        """Memory one perturbed evaluation needs: its copy of the batched parameters (and the
        masked step) plus the loss's intermediates."""
        return 3 * batched * self.dtype.itemsize + self.act_bytes

    def chunk_size(self, m: int, batched: int) -> int:
        """Perturbations per compiled call and device: at most MAX_CHUNK and within budget.

        Raises InputError when not even one evaluation fits the budget.
        """
        per = self.bytes_per_evaluation(batched)
        by_memory = self.memory_budget // per
        if by_memory < 1:
            raise InputError(
                f"one perturbed evaluation needs about {per / 2**20:.0f} MiB, more than the "
                f"memory budget of {self.memory_budget / 2**20:.0f} MiB, so a full check of "
                f"{self.sp.n:,} parameters cannot run. Use mode='directional' (random directions "
                "per leaf, then group testing to find a wrong entry) or mode='sample', or raise "
                "memory_budget.")
        limit = MAX_CHUNK if batched > SMALL_BATCHED else MAX_CHUNK_SMALL
        chunk = int(min(limit, by_memory))
        if batched <= SMALL_BATCHED:
            # Small problems: one chunk size for every call of the check (f0, noise probes,
            # each stencil), so that a single program compiles; compiling costs far more than
            # evaluating a padded chunk of a small loss.
            chunk = min(chunk, 1 << max(0, (2 * self.sp.n + 2).bit_length()))
        elif m < chunk:  # Few perturbations: the next power of two, at least MIN_CHUNK, so
            # that the handful of small calls of one check (stencils on a few entries) share a
            # compiled program.
            chunk = max(min(chunk, MIN_CHUNK), 1 << max(0, (m - 1).bit_length()))
        return max(1, chunk)

    # -- single evaluations -------------------------------------------------------------------
    def at(self, theta_np: np.ndarray | None = None) -> float:
        """The loss at the unperturbed point (traced: through the same batched program)."""
        if theta_np is None and self.traceable:
            if self.per_leaf:  # through the smallest leaf's direction batch (cheap to compile)
                k = int(np.argmin(np.diff(self.sp.offsets)))
                zero = self.vectors(np.zeros((1, self._leaf_size(k))))
                return float(self.along(k, zero, [0], [0.0], [0], [0])[0])
            return float(self.perturbed(np.zeros(1, np.int64), np.zeros(1))[0])
        self.n_evaluations += 1
        return self._host(self.theta_np if theta_np is None else theta_np)

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
        index = np.asarray(index, np.int64)
        m = len(index)
        if m == 0:
            return np.zeros(0)
        if not self.traceable:
            self.n_evaluations += m
            out = np.empty(m)
            for j in range(m):
                t = self.theta_np.copy()
                t[index[j]] += step[j]
                out[j] = self._host(t, f"while evaluating the perturbed point "
                                       f"{self.sp.locate(index[j])} {step[j]:+.3g}")
            return out
        out = np.empty(m)
        if not self.per_leaf:
            out[:] = self._batches(_losses_at, None, self.sp.n, index, step)
            return out
        leaf_of = np.searchsorted(self.sp.offsets, index, side="right") - 1
        for k in np.unique(leaf_of):
            sel = leaf_of == k
            out[sel] = self._batches(_losses_at, int(k), self._leaf_size(k),
                                     index[sel] - self.sp.offsets[k], step[sel])
        return out

    def vectors(self, vectors: np.ndarray):
        """Step vectors for `along`, placed on the device(s) once."""
        vectors = np.asarray(vectors, self.dtype)
        if not self.traceable:
            return vectors
        out = jnp.asarray(vectors)
        if self._sharding is not None:
            out = jax.device_put(out, NamedSharding(self._sharding.mesh, P()))
        return out

    def along(self, k: int, vectors, vid, mult, lo, hi) -> np.ndarray:
        """Loss with checked leaf k at x + mult[j] * vectors[vid[j]] on entries lo[j]..hi[j]-1
        (`vectors` from `self.vectors`: one row per step vector, in leaf order)."""
        vid, lo, hi = (np.asarray(a, np.int64) for a in (vid, lo, hi))
        mult = np.asarray(mult, np.float64)
        if not self.traceable:
            start, out = self.sp.offsets[k], np.empty(len(vid))
            self.n_evaluations += len(vid)
            for j in range(len(vid)):
                t = self.theta_np.copy()
                t[start + lo[j]:start + hi[j]] += mult[j] * vectors[vid[j]][lo[j]:hi[j]]
                out[j] = self._host(t, f"while evaluating a direction in "
                                       f"{self.sp.checked_specs()[k].path or '<params>'}")
            return out
        return self._batches(functools.partial(_losses_along_bound, vectors), k,
                             self._leaf_size(k), vid, mult, lo, hi)

    def complex_step(self, index: np.ndarray, step: np.ndarray, dtypes) -> np.ndarray:
        """Complex-step derivatives Im f(x + i h e_k) / h at the given entries.

        Raises InputError when the loss cannot be evaluated at complex parameters.
        """
        cdtypes = [np.result_type(d, np.complex64) for d in dtypes]
        layout, _ = make_layout(self.sp, cdtypes, self.args)
        theta = jnp.asarray(self.theta_np.astype(np.result_type(*cdtypes)))
        chunk = max(1, min(MAX_CHUNK_SMALL, 1 << max(0, (len(index) - 1).bit_length())))
        pad = (-len(index)) % chunk
        idx = np.concatenate([index, np.zeros(pad, np.int64)]).astype(np.int32)
        st = np.concatenate([step, np.ones(pad)]).astype(self.dtype)
        out = []
        try:
            for a in range(0, len(idx), chunk):
                out.append(np.asarray(_losses_complex(theta, idx[a:a + chunk], st[a:a + chunk],
                                                      self.dynamic, loss=self.loss,
                                                      layout=layout)))
        except Exception as e:  # noqa: BLE001 - the loss does not accept complex inputs
            raise InputError(
                "method='complex' needs a loss that JAX can evaluate at complex parameters, "
                f"but it raised {type(e).__name__}: {str(e).splitlines()[0]}. Use "
                "method='central' (or 'richardson').") from e
        self.n_evaluations += len(index)
        return np.concatenate(out)[:len(index)].astype(np.float64)

    def _leaf_size(self, k: int) -> int:
        return self.sp.offsets[k + 1] - self.sp.offsets[k]

    def _batches(self, fn, leaf, batched: int, *arrays) -> np.ndarray:
        """Runs fn over `arrays` (batched along axis 0) in fixed-size, padded chunks."""
        m = len(arrays[0])
        self.n_evaluations += m
        per_device = self.chunk_size(m, batched)
        chunk = per_device * len(self.devices)
        pad = (-m) % chunk
        padded = []
        for a in arrays:
            a = np.asarray(a)
            dtype = np.int32 if np.issubdtype(a.dtype, np.integer) else self.dtype
            filler = np.zeros((pad, *a.shape[1:]), dtype)
            padded.append(np.concatenate([a.astype(dtype), filler]))
        out = []
        bar = self.progress.start(m) if self.progress is not None else None
        devices = len(self.devices)
        sequential = batched > SMALL_BATCHED
        for s in range(0, m + pad, chunk):
            parts = [p[s:s + chunk].reshape(devices, per_device, *p.shape[1:]) for p in padded]
            if self._sharding is not None:
                parts = [jax.device_put(p, self._sharding) for p in parts]
            out.append(np.asarray(fn(self.theta, *parts, self.dynamic, loss=self.loss,
                                     layout=self.layout, leaf=leaf,
                                     sequential=sequential)).ravel())
            if bar is not None:
                bar.update(min(chunk, m - s))
        if bar is not None:
            bar.close()
        return np.concatenate(out)[:m].astype(np.float64)

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

    def call(self, fn: Callable) -> Any:
        """fn(params, *args) at theta, once: jitted when JAX can trace it (one compilation;
        run eagerly, every primitive would compile on its own, which measured 5x slower on a
        cold start), else on the host with NumPy copies (NumPy code, which may assign into its
        inputs)."""
        if self.traceable:
            try:
                return _call_at(self.theta, self.dynamic, fn=fn, layout=self.layout)
            except InputError:
                raise
            except Exception:  # noqa: BLE001 - not traceable: NumPy copies below.
                pass
        params, args = assemble(self.layout, self.theta_np.copy(), _copy_arrays(self.dynamic),
                                xp=np)
        args = _copy_arrays(args)
        before = _fingerprints((params, args))
        out = fn(params, *args)
        after = _fingerprints((params, args))
        self.mutated = [("params" if p.startswith("[0]") else "args") + p[3:]
                        for p in before if before[p] != after.get(p)]
        return out


def _fingerprints(tree) -> dict[str, bytes]:
    """Byte copies of every NumPy array leaf, by path: to see whether a function mutated them."""
    return {jax.tree_util.keystr(p): np.asarray(x).tobytes()
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, np.ndarray)}


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
