"""Stage 3, `evaluate`: the loss at the unperturbed and perturbed points.

The loss is traced once per check (see programs.py) into a jaxpr whose inputs are one flat
segment per checked leaf (in its evaluation dtype) followed by the array leaves that are held
fixed (the rest of params, and args). Every program of the check evaluates that one trace, so
every evaluation sees the same function: the loss as it is at call time.

The checked leaves also live in one flat vector theta. A perturbation is a pair (flat index i,
exact step s); the loss at theta + s e_i is computed for a chunk of perturbations at once by one
compiled `vmap`. The perturbation is built by adding a masked step (`where(arange == i, s, 0)`),
not with `theta.at[i].add(s)`: under vmap the latter lowers to a scatter, which XLA runs several
times slower on CPU. Every chunk has the same size (the last one is padded), so a check compiles
few programs, and a second check of an unchanged loss with the same shapes compiles nothing.

A loss that JAX cannot trace (plain NumPy forward code) falls back to a loop on the host that
produces the same numbers, more slowly. A loss that JAX can trace but not vmap (a
`jax.pure_callback` without a vmap method) is evaluated one perturbation at a time inside the
compiled program (`lax.map`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jgc._src import programs
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


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of (params, args) comes from when the loss is called."""

    params_def: Any
    args_def: Any
    # One (leaf index, start, stop, shape, dtype) per checked leaf.
    checked: tuple[tuple[int, int, int, tuple[int, ...], str], ...]
    params_static: tuple[tuple[int, Any], ...]  # non-array leaves, passed as they are
    params_dynamic: tuple[int, ...]  # fixed array leaves of params
    args_static: tuple[tuple[int, Any], ...]
    args_dynamic: tuple[int, ...]
    n_params_leaves: int
    n_args_leaves: int


def make_layout(sp: Split, dtypes, args) -> tuple[Layout, tuple]:
    """Returns the layout and the fixed array leaves of params and args."""
    checked = tuple(
        (i, sp.offsets[k], sp.offsets[k + 1], sp.specs[i].shape, str(dtypes[k]))
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
    """
    p_dyn, a_dyn = dynamic
    leaves: list[Any] = [None] * layout.n_params_leaves
    for seg, (i, _, _, shape, dt) in zip(segments, layout.checked):
        leaves[i] = xp.reshape(seg, shape)
        if cast:
            leaves[i] = leaves[i].astype(dt)
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


def segments_of(layout: Layout, theta, xp=jnp) -> list:
    return [theta[a:b] for _, a, b, _, _ in layout.checked]


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
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise InputError(f"loss must return a real floating-point scalar, but it returned "
                         f"dtype {np.dtype(dtype)}. Return a float loss.")


def _map(one, arrays, sequential: bool, batched: bool = True):
    """one(*row) over arrays shaped (devices, chunk, ...): vmapped over the devices axis (which
    is sharded across jax.devices()), and within a device either vmapped (small problems) or
    mapped sequentially in pairs (large leaves: a batched matmul whose weights differ per
    perturbation streams a fresh copy of them from memory each time, while a sequential map
    keeps one copy in cache; measured 2x faster on a 784x64 leaf). `batched=False` (a loss that
    cannot be vmapped): one perturbation at a time, on one device."""
    if not batched:
        flat = [a.reshape(-1, *a.shape[2:]) for a in arrays]
        return jax.lax.map(lambda row: one(*row), flat).reshape(arrays[0].shape[:2])

    def per_device(*rows):
        if sequential:
            return jax.lax.map(lambda a: one(*a), rows, batch_size=MAP_BATCH)
        return jax.vmap(one)(*rows)

    return jax.vmap(per_device)(*arrays)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What shapes a batched program besides the trace: the segments and how rows map."""

    kind: str
    segments: tuple[tuple[int, int, str], ...]
    leaf: int | None
    sequential: bool
    batched: bool


def _program_losses_at(traced: programs.Traced, st: _Static):
    def run(consts, theta, dynamic, index, step):
        segs = [theta[a:b] for a, b, _ in st.segments]
        base = theta if st.leaf is None else segs[st.leaf]
        positions = jnp.arange(base.shape[0])

        def one(i, s):
            value = base + jnp.where(positions == i, s, 0)
            if st.leaf is None:
                parts = [value[a:b] for a, b, _ in st.segments]
            else:
                parts = list(segs)
                parts[st.leaf] = value
            return _evaluate(traced, consts, parts, dynamic, st)

        return _map(one, (index, step), st.sequential, st.batched)

    return run


def _program_losses_along(traced: programs.Traced, st: _Static):
    """Loss with checked leaf `leaf` at x + mult[j] * vectors[vid[j]] on entries lo[j]..hi[j]-1.

    The step vectors stay on the device; a row is four numbers. mult is +-1 or a small integer
    and the mask 0 or 1, so the perturbed value is fl(x + s) for the vector's own entry s,
    exactly as the host computes it when it predicts the change.
    """
    def run(consts, theta, dynamic, vectors, vid, mult, lo, hi):
        segs = [theta[a:b] for a, b, _ in st.segments]
        base = segs[st.leaf]
        positions = jnp.arange(base.shape[0])

        def one(v, c, a, b):
            mask = (positions >= a) & (positions < b)
            parts = list(segs)
            parts[st.leaf] = base + jnp.where(mask, c * vectors[v], 0)
            return _evaluate(traced, consts, parts, dynamic, st)

        return _map(one, (vid, mult, lo, hi), st.sequential, st.batched)

    return run


def _program_complex(traced: programs.Traced, st: _Static):
    """Im loss(theta + i step[j] e_{index[j]}) / step[j]: the complex-step derivatives."""
    def run(consts, theta, dynamic, index, step):
        positions = jnp.arange(theta.shape[0])

        def one(i, s):
            z = theta + 1j * jnp.where(positions == i, s, 0)
            parts = [z[a:b] for a, b, _ in st.segments]
            return jnp.imag(_evaluate(traced, consts, parts, dynamic, st)) / s

        return _map(one, (index, step), False, st.batched)

    return run


def _program_autodiff(traced: programs.Traced, st: _Static):
    def run(consts, theta, dynamic):
        def f(t):
            return _evaluate(traced, consts, [t[a:b] for a, b, _ in st.segments], dynamic, st)

        return jax.grad(f)(theta)

    return run


def _program_call(traced: programs.Traced, st: _Static):
    def run(consts, theta, dynamic):
        return traced.evaluate(consts, *[theta[a:b] for a, b, _ in st.segments], *dynamic)

    return run


def _evaluate(traced, consts, parts, dynamic, st: _Static):
    parts = [p.astype(dt) for p, (_, _, dt) in zip(parts, st.segments)]
    (out,) = traced.evaluate(consts, *parts, *dynamic)
    return jnp.reshape(out, ())


def default_memory_budget() -> int:
    """A quarter of the memory available now, between 256 MiB and 1 GiB: room for the batch of
    perturbed evaluations without crowding the user's own arrays."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * 2**30
    return int(min(max(available // 4, 256 * 2**20), 2**30))


def activation_bytes(jaxpr) -> int:
    """An upper bound on the memory one evaluation of the loss touches: the sum of every
    intermediate value's size in its jaxpr (XLA fuses and frees most of them)."""
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


class TooSlow(Exception):
    """A full check would take too long (mode="auto"): `predicted` seconds."""

    def __init__(self, predicted: float, directional: float):
        super().__init__(f"predicted {predicted:.1f} s")
        self.predicted, self.directional = predicted, directional


@dataclasses.dataclass
class Deadline:
    """mode="auto": predicts a full check's time from the measured throughput of the programs
    it actually runs (after compilation), while its first stencil runs, largest leaves first.

    After each chunk the prediction is: factor x (execution so far + the evaluations still to
    do at the highest per-evaluation cost seen so far) + compilation so far + the leaf programs
    still to compile at the mean compile time seen so far. `factor` scales the first stencil to
    the whole check (2h everywhere in reduced precision, Richardson's 4h). TooSlow is raised
    when the prediction exceeds both `seconds` and what directional mode would cost (per leaf:
    a compile and about DIRECTIONAL_EVALS evaluations): a full check that is cheaper than the
    alternative is always run.
    """

    seconds: float
    factor: float
    n_leaves: int
    total: int = 0  # evaluations of the first stencil
    done: int = 0
    execution: float = 0.0
    compiling: float = 0.0
    compiled: int = 0  # programs compiled so far in this pass
    groups_left: int = 0
    rate: float = 0.0  # the highest seconds per evaluation seen so far

    def observe(self, evals: int, padded: int, seconds: float) -> None:
        """A chunk of `evals` evaluations (`padded` with the padding) ran in `seconds`."""
        self.done += evals
        self.execution += seconds
        self.rate = max(self.rate, seconds / max(padded, 1))
        mean_compile = self.compiling / max(self.compiled, 1)
        predicted = (self.factor * (self.execution + (self.total - self.done) * self.rate)
                     + self.compiling + self.groups_left * mean_compile)
        directional = self.n_leaves * (mean_compile + DIRECTIONAL_EVALS * self.rate)
        if predicted > max(self.seconds, directional):
            raise TooSlow(predicted, directional)


# Evaluations directional mode spends per leaf: 2 directions x (4 + up to 8 refining) and the
# noise probes, plus a sample of 16 entries x 2 to 4 (auto mode's sample).
DIRECTIONAL_EVALS = 60


def _first_line(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class Evaluator:
    """Evaluates loss(params, *args) at perturbations of the checked leaves.

    Attributes:
      traceable: whether JAX can trace the loss (else every evaluation is a host loop).
      batched: whether the loss can be vmapped (else one perturbation at a time, compiled).
      n_evaluations: loss evaluations so far (padding excluded).
      trace_error: why the loss could not be traced, when it could not.
      batch_error: why the loss could not be vmapped, when it could not.
      per_leaf: whether batches perturb one leaf at a time (large problems) or the whole
        flat vector (small ones: a single compiled function).
      mutated: paths of the arrays a host-called function changed in place.
      grad_note: how the gradient function was called, when that is worth saying.
    """

    def __init__(self, loss: Callable, sp: Split, theta: np.ndarray, dtypes, args: tuple, *,
                 has_aux: bool = False, memory_budget: int | None = None, progress=None):
        self.loss, self.sp, self.args, self.has_aux = loss, sp, args, has_aux
        self.layout, self.dynamic = make_layout(sp, dtypes, args)
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        # One dtype for the flat vector: every leaf's values and steps are exact in it.
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
        self.theta_np = theta.astype(self.dtype)
        self.n_evaluations = 0
        self.trace_error: str | None = None
        self.batch_error: str | None = None
        self.batched = True
        self.mutated: list[str] = []
        self.grad_note: str | None = None
        self.out_dtype = np.dtype(np.float64)  # The loss's output dtype, once seen.
        self.memory_budget = (default_memory_budget() if memory_budget is None
                              else int(memory_budget))
        self.progress = progress
        self.segments = tuple((a, b, str(dt)) for (_, a, b, _, _), dt in
                              zip(self.layout.checked, self.dtypes))
        self.traced = self._trace()
        self.traceable = self.traced is not None
        if self.traceable:
            self.devices = jax.devices()
            self.per_leaf = sp.n >= PER_LEAF_MIN and len(sp.checked) > 1
            # Activation memory matters for budgeting large problems only.
            self.act_bytes = (activation_bytes(self.traced.closed.jaxpr)
                              if sp.n > SMALL_BATCHED else 0)
            self._place()
        else:
            self.host_dynamic = _copy_arrays(self.dynamic)

    # -- tracing ------------------------------------------------------------------------------
    def _flat_loss(self, *flat):
        k, n_p = len(self.segments), len(self.layout.params_dynamic)
        dynamic = (flat[k:k + n_p], flat[k + n_p:])
        params, args = assemble(self.layout, flat[:k], dynamic, cast=False)
        return loss_value(self.loss(params, *args), self.has_aux)

    def _avals(self, dtypes=None):
        segs = [jax.ShapeDtypeStruct((b - a,), dt)
                for (a, b, _), dt in zip(self.segments, dtypes or self.dtypes)]
        return (*segs, *self.dynamic[0], *self.dynamic[1])

    def _trace(self) -> programs.Traced | None:
        """Traces the loss once (no compilation) and checks that it returns a scalar.

        A loss that raises InputError (a pair without has_aux, say) is refused; any other
        tracing failure means the loss is not JAX code: the host loop evaluates it.
        """
        try:
            traced = programs.trace(self._flat_loss, *self._avals())
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - any tracing failure means: use the host loop.
            self.trace_error = _first_line(e)
            return None
        (out,) = traced.closed.out_avals
        check_scalar(out.shape, out.dtype)
        self.out_dtype = np.dtype(out.dtype)
        return traced

    def _place(self) -> None:
        """Puts theta, the fixed leaves and the trace's constants on the device(s) once."""
        self.theta = jnp.asarray(self.theta_np)
        self.dyn = tuple(jnp.asarray(x) for x in (*self.dynamic[0], *self.dynamic[1]))
        self.consts = [jnp.asarray(c) for c in self.traced.consts]
        self._sharding = None
        if len(self.devices) > 1:
            mesh = Mesh(np.array(self.devices), ("p",))
            self._sharding = NamedSharding(mesh, P("p"))
            replicated = NamedSharding(mesh, P())
            self.theta, self.dyn, self.consts = jax.device_put(
                (self.theta, self.dyn, self.consts), replicated)

    def _static(self, kind: str, leaf: int | None, sequential: bool) -> _Static:
        return _Static(kind, self.segments, leaf, sequential, self.batched)

    def _program(self, kind: str, build, traced, static: _Static, rows: tuple):
        args = (traced.consts if traced is not self.traced else self.consts, self.theta,
                self.dyn, *rows)
        return programs.compiled(kind, lambda: build(traced, static), static, (traced,), args)

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
    def at(self) -> float:
        """The loss at the unperturbed point (traced: through the same batched program)."""
        if self.traceable:
            if self.per_leaf:  # through the smallest leaf's direction batch (cheap to compile)
                k = int(np.argmin(np.diff(self.sp.offsets)))
                zero = self.vectors(np.zeros((1, self._leaf_size(k))))
                return float(self.along(k, zero, [0], [0.0], [0], [0])[0])
            return float(self.perturbed(np.zeros(1, np.int64), np.zeros(1))[0])
        self.n_evaluations += 1
        return self._host(self.theta_np)

    def _host(self, t: np.ndarray, where: str = "at params") -> float:
        params, args = assemble(self.layout, segments_of(self.layout, t), self.host_dynamic,
                                xp=np)
        try:
            out = loss_value(self.loss(params, *args), self.has_aux)
        except InputError:
            raise
        except Exception as e:
            raise InputError(
                f"loss(params, *args) raised {type(e).__name__}: {e}\n  {where}, with params "
                f"= {tree_pformat(params)}.\n  (JAX could not trace the loss either: "
                f"{self.trace_error})") from e
        arr = np.asarray(out)
        check_scalar(arr.shape, arr.dtype)
        self.out_dtype = arr.dtype
        return float(arr.reshape(()))

    # -- batches ------------------------------------------------------------------------------
    def perturbed(self, index: np.ndarray, step: np.ndarray, deadline: Deadline | None = None
                  ) -> np.ndarray:
        """Loss at theta + step[j] * e_{index[j]}, for each j; returns float64 values.

        With a `deadline` (mode="auto"), leaves are evaluated largest first and TooSlow is
        raised as soon as a full check is predicted to take too long.
        """
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
        if deadline is not None:
            deadline.total += m
        if not self.per_leaf:
            out[:] = self._batches("losses_at", _program_losses_at, None, self.sp.n, (),
                                   index, step, deadline=deadline)
            return out
        leaf_of = np.searchsorted(self.sp.offsets, index, side="right") - 1
        leaves = sorted(np.unique(leaf_of), key=lambda k: -self._leaf_size(k))
        for done, k in enumerate(leaves):
            sel = leaf_of == k
            if deadline is not None:
                deadline.groups_left = len(leaves) - done - 1
            out[sel] = self._batches("losses_at", _program_losses_at, int(k),
                                     self._leaf_size(k), (), index[sel] - self.sp.offsets[k],
                                     step[sel], deadline=deadline)
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
        return self._batches("losses_along", _program_losses_along, k, self._leaf_size(k),
                             (vectors,), vid, mult, lo, hi)

    def complex_step(self, index: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Complex-step derivatives Im f(x + i h e_k) / h at the given entries.

        Raises InputError when the loss cannot be evaluated at complex parameters.
        """
        cdtypes = [np.result_type(d, np.complex64) for d in self.dtypes]
        why = ("method='complex' needs a loss that JAX can evaluate at complex parameters, "
               "but it raised {}. Use method='central' (or 'richardson').")
        try:
            traced = programs.trace(self._flat_loss, *self._avals(cdtypes))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - the loss does not accept complex inputs
            raise InputError(why.format(_first_line(e))) from e
        theta = jnp.asarray(self.theta_np.astype(np.result_type(*cdtypes)))
        static = _Static("complex", tuple((a, b, str(dt)) for (a, b, _), dt in
                                          zip(self.segments, cdtypes)), None, False,
                         self.batched)
        chunk = max(1, min(MAX_CHUNK_SMALL, 1 << max(0, (len(index) - 1).bit_length())))
        pad = (-len(index)) % chunk
        idx = np.concatenate([index, np.zeros(pad, np.int64)]).astype(np.int32)
        st = np.concatenate([step, np.ones(pad)]).astype(self.dtype)
        consts = [jnp.asarray(c) for c in traced.consts]
        out = []
        try:
            for a in range(0, len(idx), chunk):
                rows = (idx[a:a + chunk][None], st[a:a + chunk][None])
                args = (consts, theta, self.dyn, *rows)
                program = programs.compiled("complex", lambda: _program_complex(traced, static),
                                            static, (traced,), args)
                out.append(np.asarray(program(*args)).ravel())
        except Exception as e:  # noqa: BLE001 - the loss does not accept complex inputs
            raise InputError(why.format(_first_line(e))) from e
        self.n_evaluations += len(index)
        return np.concatenate(out)[:len(index)].astype(np.float64)

    def _leaf_size(self, k: int) -> int:
        return self.sp.offsets[k + 1] - self.sp.offsets[k]

    def _batches(self, kind, build, leaf, batched: int, extra: tuple, *arrays,
                 deadline: Deadline | None = None) -> np.ndarray:
        """Runs a batched program over `arrays` (along axis 0) in fixed-size, padded chunks.

        A loss that cannot be vmapped (the first compilation fails) is run again one
        perturbation at a time, and `batch_error` says why.
        """
        self.n_evaluations += len(arrays[0])
        static = self._static(kind, leaf, batched > SMALL_BATCHED)
        try:
            return self._chunks(kind, build, static, batched, extra, arrays, deadline)
        except InputError:
            raise
        except _Unbatchable as e:
            self.batched, self.batch_error = False, _first_line(e.__cause__)
            static = self._static(kind, leaf, False)
            return self._chunks(kind, build, static, batched, extra, arrays, deadline)

    def _chunks(self, kind, build, static, batched, extra, arrays, deadline=None
                ) -> np.ndarray:
        m = len(arrays[0])
        per_device = self.chunk_size(m, batched)
        devices = len(self.devices) if self.batched else 1
        chunk = per_device * devices
        pad = (-m) % chunk
        padded = []
        for a in arrays:
            a = np.asarray(a)
            dtype = np.int32 if np.issubdtype(a.dtype, np.integer) else self.dtype
            filler = np.zeros((pad, *a.shape[1:]), dtype)
            padded.append(np.concatenate([a.astype(dtype), filler]))
        out, program = [], None
        bar = self.progress.start(m) if self.progress is not None else None
        for s in range(0, m + pad, chunk):
            parts = [p[s:s + chunk].reshape(devices, per_device, *p.shape[1:]) for p in padded]
            if self._sharding is not None and self.batched:
                parts = [jax.device_put(p, self._sharding) for p in parts]
            rows = (*extra, *parts)
            if program is None:
                started = time.perf_counter()
                try:
                    program = self._program(kind, build, self.traced, static, rows)
                except InputError:
                    raise
                except Exception as e:  # noqa: BLE001 - vmap failed: one at a time
                    if not self.batched:
                        raise
                    raise _Unbatchable() from e
                if deadline is not None:
                    deadline.compiling += time.perf_counter() - started
                    deadline.compiled += 1
            started = time.perf_counter()
            out.append(np.asarray(program(self.consts, self.theta, self.dyn, *rows)).ravel())
            if deadline is not None:
                deadline.observe(min(chunk, m - s), chunk, time.perf_counter() - started)
            if bar is not None:
                bar.update(min(chunk, m - s))
        if bar is not None:
            bar.close()
        return np.concatenate(out)[:m].astype(np.float64)

    # -- gradients ----------------------------------------------------------------------------
    def autodiff(self) -> tuple[np.ndarray | None, str | None, BaseException | None]:
        """jax.grad of the loss at theta, or (None, why, the exception) when unavailable."""
        if not self.traceable:
            return None, "the loss is not traceable by JAX", None
        static = _Static("autodiff", self.segments, None, False, True)
        try:
            program = self._program("autodiff", _program_autodiff, self.traced, static, ())
            g = program(self.consts, self.theta, self.dyn)
        except Exception as e:  # noqa: BLE001 - report why, check the rest.
            return None, f"jax.grad failed: {_first_line(e)}", e
        return np.asarray(g), None, None  # In its own dtype: its precision enters the model.

    def call(self, fn: Callable) -> Any:
        """fn(params, *args) at theta, called once.

        A traceable loss suggests JAX code: fn is traced once and run compiled (run eagerly,
        every primitive would compile on its own, which measured 5x slower on a cold start). If
        JAX cannot trace it (NumPy code), it is called on the host with NumPy copies (it may
        assign into its inputs), and `grad_note` says so. A NumPy loss suggests NumPy code:
        fn is then called on the host directly, exactly once.
        """
        if self.traceable:
            try:
                traced = programs.trace(lambda *flat: fn(*_apply(assemble(
                    self.layout, flat[:len(self.segments)], (
                        flat[len(self.segments):len(self.segments) + len(self.dynamic[0])],
                        flat[len(self.segments) + len(self.dynamic[0]):])))), *self._avals())
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 - not traceable: NumPy copies below.
                self.grad_note = (
                    "grad(params, *args) is not traceable by JAX, so jgc called it on the host "
                    "with NumPy copies; it ran twice: JAX's tracer ran it first and stopped at "
                    f"{_first_line(e)}")
            else:
                static = _Static("call", self.segments, None, False, True)
                program = programs.compiled(
                    "call", lambda: _program_call(traced, static), static, (traced,),
                    ([jnp.asarray(c) for c in traced.consts], self.theta, self.dyn))
                flat = program([jnp.asarray(c) for c in traced.consts], self.theta, self.dyn)
                return jax.tree_util.tree_unflatten(traced.out_tree, flat)
        params, args = assemble(self.layout, segments_of(self.layout, self.theta_np.copy()),
                                _copy_arrays(self.dynamic), xp=np)
        args = _copy_arrays(args)
        before = _fingerprints((params, args))
        out = fn(params, *args)
        after = _fingerprints((params, args))
        self.mutated = [("params" if p.startswith("[0]") else "args") + p[3:]
                        for p in before if before[p] != after.get(p)]
        return out


class _Unbatchable(Exception):
    """The batched program could not be built (the loss does not vmap); see __cause__."""


def _copy_arrays(tree):
    """NumPy copies of the array leaves, so a host function cannot mutate the user's arrays."""
    return jax.tree_util.tree_map(lambda x: np.array(x) if _is_array(x) else x, tree)


def _fingerprints(tree) -> dict[str, bytes]:
    """Byte copies of every NumPy array leaf, by path: to see whether a function mutated them."""
    return {jax.tree_util.keystr(p): np.asarray(x).tobytes()
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, np.ndarray)}


def _apply(params_args):
    params, args = params_args
    return (params, *args)
