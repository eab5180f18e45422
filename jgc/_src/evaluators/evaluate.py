"""Stage 3, `evaluate`: a function at the unperturbed and perturbed points, behind one interface.

`make_evaluator` returns one of three strategies:

* `DenseEvaluator`: the function is traced once per check (see programs.py) into a jaxpr whose
  inputs are one flat segment per checked leaf (in its evaluation dtype) followed by the array
  leaves that are held fixed (the rest of params, and args). Every program of the check evaluates
  that one trace, so every evaluation sees the same function: the loss as it is at call time.
  The checked leaves also live in one flat vector theta; a perturbation is a pair (flat index i,
  exact step s), and the function at theta + s e_i is computed for a chunk of perturbations at
  once by one compiled `vmap`. The perturbation is built by adding a masked step
  (`where(arange == i, s, 0)`), not with `theta.at[i].add(s)`: under vmap the latter lowers to a
  scatter, which XLA runs several times slower on CPU. Every chunk has the same size (the last
  one is padded), so a check compiles few programs, and a second check of an unchanged loss with
  the same shapes compiles nothing. A function JAX can trace but not vmap (a `jax.pure_callback`
  without a vmap method) is evaluated one perturbation at a time inside the compiled program.
* `StructuredEvaluator` (a loss with at least STRUCTURED_MIN parameters; the default there, off
  with the environment variable JGC_STRUCTURED=0): the dense evaluator, except that one-entry
  perturbations of a leaf go through structured.py's pass over the same trace, which recomputes
  only what each perturbation changes (a column of a layer's output, one output channel of a
  convolution, a rank-1 update of the next layer), wherever its planned work is at most half
  the dense pass's. Directions in such a leaf (whole-leaf perturbations: directional mode and
  its group testing) start from the same pass's leaf-independent base values and run every
  equation that depends on the leaf densely, so the layers upstream of it are computed once
  per check. Its values agree with the dense evaluator's to rounding; the complex step and
  vector functions stay dense. The report's notes say which leaves took which path.
* `HostEvaluator`: a function JAX cannot trace (plain NumPy forward code), evaluated in a loop on
  the host, with the same results, more slowly.

The function is a loss (output "scalar") or any function of the parameters returning arrays
(output "vector": check_jvp's f, check_hvp's gradient), whose outputs are flattened into one
vector per evaluation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jgc._src.evaluators import programs, structured
from jgc._src.evaluators.calls import (
    first_line,
    forbidden_promotion,
    numpy_code,
    promotion_advice,
    promotion_refused,
    user_call,
)
from jgc._src.stages.split import InputError, Split, flat_output, merge_parts, tree_pformat

# Perturbations per compiled call. Measured on 2 CPU cores: 32 to 64 per chunk runs best for
# large leaves; more only grows the (chunk x n) perturbation matrix. Small problems take larger
# chunks, which cuts the per-call dispatch overhead that dominates them.
MAX_CHUNK = 64
MAX_CHUNK_SMALL = 512
MIN_CHUNK = 2
MAP_BATCH = 2  # large leaves: perturbations evaluated two at a time within a chunk
SMALL_BATCHED = 4096  # "small": at most this many batched parameters per perturbation
# From this many parameters on, each leaf gets its own batched function (a compile each), so that
# computation not depending on the perturbed leaf is done once per batch instead of per
# perturbation. Below it, one function over the flat vector (a single compile) is cheaper.
PER_LEAF_MIN = 20_000
# The programs' index rows (perturbed entries, direction ranges) are int32 (`_padded`); the
# positions they are compared with are made in the same dtype, as jax_numpy_dtype_promotion=
# 'strict' has no implicit path between int32 and x64's default int64.
INDEX_DTYPE = np.int32


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

def _map(one, arrays, sequential: bool, batched: bool = True):
    """one(*row) over arrays shaped (devices, chunk, ...): vmapped over the devices axis (which
    is sharded across jax.devices()), and within a device either vmapped (small problems) or
    mapped sequentially in pairs (large leaves: a batched matmul whose weights differ per
    perturbation streams a fresh copy of them from memory each time, while a sequential map
    keeps one copy in cache; measured 2x faster on a 784x64 leaf). `batched=False` (a function
    that cannot be vmapped): one perturbation at a time, on one device."""
    if not batched:
        flat = [a.reshape(-1, *a.shape[2:]) for a in arrays]
        out = jax.lax.map(lambda row: one(*row), flat)
        return out.reshape(*arrays[0].shape[:2], *out.shape[1:])

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
    vector: bool


def _evaluate(traced, consts, parts, dynamic, st: _Static):
    parts = [p.astype(dt) for p, (_, _, dt) in zip(parts, st.segments)]
    outs = traced.evaluate(consts, *parts, *dynamic)
    if st.vector:
        return flat_output(outs)
    return jnp.reshape(outs[0], ())


def _program_losses_at(traced: programs.Traced, st: _Static):
    def run(consts, theta, dynamic, index, step):
        segs = [theta[a:b] for a, b, _ in st.segments]
        base = theta if st.leaf is None else segs[st.leaf]
        positions = jnp.arange(base.shape[0], dtype=INDEX_DTYPE)

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
    """The function with checked leaf `leaf` (or the whole flat vector, leaf=None) at
    x + mult[j] * vectors[vid[j]] on entries lo[j]..hi[j]-1.

    The step vectors stay on the device; a row is four numbers. mult is +-1 or a power of two
    and the mask 0 or 1, so the perturbed value is fl(x + s) for the vector's own entry s,
    exactly as the host computes it when it predicts the change.
    """
    def run(consts, theta, dynamic, vectors, vid, mult, lo, hi):
        segs = [theta[a:b] for a, b, _ in st.segments]
        base = theta if st.leaf is None else segs[st.leaf]
        positions = jnp.arange(base.shape[0], dtype=INDEX_DTYPE)

        def one(v, c, a, b):
            value = _displaced(base, positions, vectors, v, c, a, b)
            if st.leaf is None:
                parts = [value[a:b] for a, b, _ in st.segments]
            else:
                parts = list(segs)
                parts[st.leaf] = value
            return _evaluate(traced, consts, parts, dynamic, st)

        return _map(one, (vid, mult, lo, hi), st.sequential, st.batched)

    return run


def _displaced(base, positions, vectors, v, c, a, b):
    """base + c * vectors[v] on entries a..b-1: one row of a direction batch. mult is +-1 or a
    power of two and the mask 0 or 1, so the value is fl(x + s) for the vector's own entry s."""
    return base + jnp.where((positions >= a) & (positions < b), c * vectors[v], 0)


def _program_complex(traced: programs.Traced, st: _Static):
    """Im loss(theta + i step[j] e_{index[j]}) / step[j]: the complex-step derivatives."""
    def run(consts, theta, dynamic, index, step):
        positions = jnp.arange(theta.shape[0], dtype=INDEX_DTYPE)

        def one(i, s):
            # Explicit casts, as standard promotion would make them (the step to theta's
            # complex dtype, the imaginary part to the step's): they hold under
            # jax_numpy_dtype_promotion='strict' too.
            z = theta + 1j * jnp.where(positions == i, s, 0).astype(theta.dtype)
            parts = [z[a:b] for a, b, _ in st.segments]
            out = _evaluate(traced, consts, parts, dynamic, st)
            return jnp.imag(out).astype(s.dtype) / s

        return _map(one, (index, step), False, st.batched)

    return run


def nbytes(n: float) -> str:
    """A size for messages: '512 bytes', '3.5 KiB', '240 MiB', '1.5 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} byte{'s' if int(n) != 1 else ''}"


def default_memory_budget() -> int:
    """A quarter of the memory available now, between 256 MiB and 1 GiB: room for the batch of
    perturbed evaluations without crowding the user's own arrays."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * 2**30
    return int(min(max(available // 4, 256 * 2**20), 2**30))


def agreed_budget(budget: int) -> int:
    """The memory budget every process uses: under jax.distributed the smallest of theirs
    (memory is per process), so that all choose the same chunks and run the same programs; a
    different chunk on one process would leave the others waiting at a collective."""
    return int(programs.process_min(budget))


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


# -- mode="auto": timing the real programs ---------------------------------------------------

class TooSlow(Exception):
    """A full check would take too long (mode="auto"): `predicted` seconds, `per_eval` seconds
    per evaluation on average."""

    def __init__(self, predicted: float, directional: float, per_eval: float):
        super().__init__(f"predicted {predicted:.1f} s")
        self.predicted, self.directional, self.per_eval = predicted, directional, per_eval


@dataclasses.dataclass
class Deadline:
    """mode="auto": predicts a full check's time from the measured throughput of the programs
    it actually runs (after compilation), while its first stencil runs, largest leaves first.

    Each leaf's evaluations are registered with the work one of them does (`expect`; the
    structured evaluator's per-leaf estimate, or the same for every leaf on the dense path).
    After each chunk the prediction is: factor x (execution so far + the evaluations still to
    do x their work x the highest seconds per unit of work of any program so far) +
    compilation so far + the leaf programs still to compile at the mean compile time so far.
    A program's rate is its mean over its chunks, leaving out its first chunk once there are
    others: a program's first run also pays for its buffers and threads (5x the rest on the
    MNIST CNN). `factor` scales the first stencil to the whole check (2h everywhere in reduced
    precision, Richardson's 4h). TooSlow is raised when the prediction exceeds both `seconds`
    and what directional mode would cost (per leaf: a compile and about DIRECTIONAL_EVALS
    evaluations): a full check that is cheaper than the alternative is always run.
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
    rate: float = 0.0  # the highest seconds per evaluation of any program so far
    unit_rate: float = 0.0  # the highest seconds per unit of work of any program so far
    pending: dict = dataclasses.field(default_factory=dict)  # leaf -> [evaluations left, work]
    current: Any = None
    chunks: list = dataclasses.field(default_factory=list)  # the current program's (n, s)
    finished: tuple = (0.0, 0.0)  # (rate, unit_rate) before the current program

    def expect(self, leaf, evaluations: int, work: float) -> None:
        """`evaluations` of `leaf` are to come, each doing `work` (any consistent unit)."""
        self.total += evaluations
        self.pending[leaf] = [evaluations, max(work, 1e-30)]

    def next_program(self, leaf) -> None:
        """The chunks that follow are `leaf`'s, run by another program."""
        self.finished, self.chunks, self.current = (self.rate, self.unit_rate), [], leaf

    def observe(self, evals: int, padded: int, seconds: float) -> None:
        """A chunk of `evals` evaluations (`padded` with the padding) ran in `seconds`."""
        self.done += evals
        self.execution += seconds
        self.chunks.append((max(padded, 1), seconds))
        steady = self.chunks[1:] or self.chunks
        rate = sum(t for _, t in steady) / sum(n for n, _ in steady)
        left = self.pending.setdefault(self.current, [0, 1.0])
        left[0] = max(0, left[0] - evals)
        self.rate = max(self.finished[0], rate)
        self.unit_rate = max(self.finished[1], rate / left[1])
        to_do = sum(n * w for n, w in self.pending.values()) * self.unit_rate
        mean_compile = self.compiling / max(self.compiled, 1)
        predicted = (self.factor * (self.execution + to_do) + self.compiling
                     + self.groups_left * mean_compile)
        directional = self.n_leaves * (mean_compile + DIRECTIONAL_EVALS * self.rate)
        # A program's first chunk alone does not decide, unless it was already slow: the
        # second is cheap next to the budget and gives the steady rate.
        first = len(self.chunks) == 1 and seconds < self.seconds / 4
        per_eval = (self.execution + to_do) / max(self.total, 1)
        slow = predicted > max(self.seconds, directional) and not first
        # One decision for every process (jax.distributed): process 0's, as timings differ.
        slow, predicted, directional, per_eval = programs.from_process_0(
            [slow, predicted, directional, per_eval])
        if slow:
            raise TooSlow(predicted, directional, per_eval)


# Evaluations directional mode spends per leaf: 2 directions x (4 + up to 8 refining) and the
# noise probes, plus a sample of 16 entries x 2 to 4 (auto mode's sample).
DIRECTIONAL_EVALS = 60


# -- the strategies -------------------------------------------------------------------------

class Evaluator:
    """The interface of every strategy: the function at theta and at perturbations of it.

    Attributes:
      traceable: whether JAX could trace the function (DenseEvaluator) or not (HostEvaluator).
      n_evaluations: evaluations so far (padding excluded).
      out_dtype: the function's output dtype. out_size: outputs per evaluation (1 for a loss).
      trace_error: why JAX could not trace it, when it could not.
      batch_error: why JAX could not vmap it, when it could not.
    """

    traceable: bool = False
    batch_error: str | None = None
    trace_error: str | None = None

    def __init__(self, fn: Callable, sp: Split, theta: np.ndarray, dtypes, args: tuple, *,
                 vector: bool = False, has_aux: bool = False):
        self.fn, self.sp, self.args, self.has_aux, self.vector = fn, sp, args, has_aux, vector
        self.layout, self.dynamic = make_layout(sp, dtypes, args)
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        # One dtype for the flat vector: every leaf's values and steps are exact in it.
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
        self.theta_np = theta.astype(self.dtype)
        self.segments = tuple((a, b, str(dt)) for (_, a, b, *_), dt in
                              zip(self.layout.checked, self.dtypes))
        self.n_evaluations = 0
        self.out_dtype = np.dtype(np.float64)
        self.out_size = 1
        self.out_tree = None

    def leaf_size(self, k: int) -> int:
        return self.sp.offsets[k + 1] - self.sp.offsets[k]

    def host_inputs(self):
        """(params, args) at theta as NumPy copies: a host call cannot mutate the user's arrays
        nor the check's own."""
        params, args = assemble(self.layout, segments_of(self.layout, self.theta_np.copy()),
                                _copy_arrays(self.dynamic), xp=np)
        return params, _copy_arrays(args)

    def at(self):
        """The function at the unperturbed point: a float (a loss) or a flat vector."""
        raise NotImplementedError

    def perturbed(self, index: np.ndarray, step: np.ndarray, deadline=None) -> np.ndarray:
        """The function at theta + step[j] * e_{index[j]}, for each j: values (m,) for a loss,
        (m, out_size) for a vector function, in float64."""
        raise NotImplementedError

    def strategy_note(self) -> str:
        """How the perturbations were evaluated, when the report should say so."""
        return ""

    def vectors(self, vectors: np.ndarray):
        """Step vectors for `along`, placed where `along` evaluates (the device(s))."""
        return np.asarray(vectors, self.dtype)

    def along(self, k: int | None, vectors, vid, mult, lo, hi) -> np.ndarray:
        """The function with checked leaf k (None: the whole flat vector) at
        x + mult[j] * vectors[vid[j]] on entries lo[j]..hi[j]-1."""
        raise NotImplementedError


class HostEvaluator(Evaluator):
    """A function JAX cannot trace, evaluated one perturbation at a time on the host."""

    def __init__(self, fn, sp, theta, dtypes, args, *, vector=False, has_aux=False,
                 trace_error: str = ""):
        super().__init__(fn, sp, theta, dtypes, args, vector=vector, has_aux=has_aux)
        self.trace_error = trace_error
        self.host_dynamic = _copy_arrays(self.dynamic)

    def _host(self, t: np.ndarray, where: str = "at params"):
        params, args = assemble(self.layout, segments_of(self.layout, t), self.host_dynamic,
                                xp=np)
        what = "f(*primals)" if self.vector else "loss(params, *args)"
        out = user_call(what, self.fn, params, *args,
                        context=f"{where}, with params = {tree_pformat(params)}.\n  (JAX could "
                                f"not trace it either: {self.trace_error})")
        if self.vector:
            self.out_tree = jax.tree_util.tree_structure(out)
            arr = np.asarray(flat_output(out, np), np.float64)
            self.out_size = arr.size
            return arr
        arr = np.asarray(loss_value(out, self.has_aux))
        check_scalar(arr.shape, arr.dtype)
        self.out_dtype = arr.dtype
        return float(arr.reshape(()))

    def at(self):
        self.n_evaluations += 1
        return self._host(self.theta_np)

    def _loop(self, points, where) -> np.ndarray:
        self.n_evaluations += len(points)
        return np.array([self._host(t, w) for t, w in zip(points, where)], np.float64)

    def perturbed(self, index, step, deadline=None) -> np.ndarray:
        del deadline  # never timed: mode="auto" runs a host loop in full (no faster mode exists)
        index = np.asarray(index, np.int64)
        points, where = [], []
        for i, s in zip(index, step):
            t = self.theta_np.copy()
            t[i] += s
            points.append(t)
            where.append(f"while evaluating the perturbed point {self.sp.locate(i)} {s:+.3g}")
        return self._loop(points, where) if len(index) else np.zeros(0)

    def along(self, k, vectors, vid, mult, lo, hi) -> np.ndarray:
        start = 0 if k is None else self.sp.offsets[k]
        name = ("the parameters" if k is None
                else self.sp.checked_specs()[k].path or "<params>")
        points = []
        for v, c, a, b in zip(vid, mult, lo, hi):
            t = self.theta_np.copy()
            t[start + a:start + b] += c * vectors[v][a:b]
            points.append(t)
        return self._loop(points, [f"while evaluating a direction in {name}"] * len(points))


class DenseEvaluator(Evaluator):
    """A traceable function: one trace, batched compiled programs (see the module doc)."""

    traceable = True

    def __init__(self, fn, sp, theta, dtypes, args, *, traced: programs.Traced, vector=False,
                 has_aux=False, memory_budget: int | None = None, progress=None):
        super().__init__(fn, sp, theta, dtypes, args, vector=vector, has_aux=has_aux)
        self.traced = traced
        outs = traced.closed.out_avals
        self.out_dtype = np.result_type(*[o.dtype for o in outs]) if outs else self.dtype
        self.out_size = sum(int(np.prod(o.shape, dtype=np.int64))  # complex: its real view
                            * (2 if np.issubdtype(o.dtype, np.complexfloating) else 1)
                            for o in outs) if vector else 1
        self.out_tree = traced.out_tree
        self.memory_budget = agreed_budget(default_memory_budget() if memory_budget is None
                                           else int(memory_budget))
        self.progress = progress
        self.batched = True
        self.devices = jax.devices()
        self._compiled_chunks: set = set()  # (static, chunk) of programs _precompile compiled
        self.per_leaf = sp.n >= PER_LEAF_MIN and len(sp.checked) > 1
        # Activation memory matters for budgeting large problems only.
        self.act_bytes = activation_bytes(traced.closed.jaxpr) if sp.n > SMALL_BATCHED else 0
        # The work of one evaluation (structured._cost's units), for the XLA options
        # (programs.light); infinite with a while loop (unknown trips): fully optimised.
        self.work = structured.jaxpr_cost(traced.closed)
        self._place()

    # -- the single trace, and what programs are given ---------------------------------------
    def avals(self, dtypes=None):
        """Shapes and dtypes of the trace's inputs: one flat segment per checked leaf, then the
        fixed array leaves."""
        segs = [jax.ShapeDtypeStruct((b - a,), dt)
                for (a, b, _), dt in zip(self.segments, dtypes or self.dtypes)]
        return (*segs, *self.dynamic[0], *self.dynamic[1])

    def call_args(self, flat):
        """(params, *args) from the trace's flat inputs, for tracing another function."""
        k, n_p = len(self.segments), len(self.dynamic[0])
        params, args = assemble(self.layout, flat[:k], (flat[k:k + n_p], flat[k + n_p:]),
                                cast=False)
        return (params, *args)

    def _place(self) -> None:
        """Puts theta, the fixed leaves and the trace's constants on the device(s) once."""
        # device_put, not jnp.asarray: in this JAX, jnp.asarray compiles a small program per
        # new shape (about 12 ms each, a third of a tiny check's first call).
        self.theta = jax.device_put(self.theta_np)
        self.dyn = tuple(jax.device_put(x) for x in (*self.dynamic[0], *self.dynamic[1]))
        self.consts = [jax.device_put(c) for c in self.traced.consts]
        self._sharding = None
        if len(self.devices) > 1:
            mesh = Mesh(np.array(self.devices), ("p",))
            self._sharding = NamedSharding(mesh, P("p"))
            replicated = NamedSharding(mesh, P())
            self.theta, self.dyn, self.consts = jax.device_put(
                (self.theta, self.dyn, self.consts), replicated)

    def _static(self, kind: str, leaf: int | None, batched: int) -> _Static:
        """What shapes a program besides its inputs. `batched`: the entries each perturbation
        carries; above SMALL_BATCHED the perturbations are mapped sequentially (see `_map`)."""
        return _Static(kind, self.segments, leaf, batched > SMALL_BATCHED, self.batched,
                       self.vector)

    # -- memory -------------------------------------------------------------------------------
    def bytes_per_evaluation(self, batched: int) -> int:
        """Memory one perturbed evaluation needs: its copy of the batched parameters (and the
        masked step) plus the function's intermediates."""
        return 3 * batched * self.dtype.itemsize + self.act_bytes

    def chunk_size(self, m: int, batched: int) -> int:
        """Perturbations per compiled call and device: at most MAX_CHUNK and within budget.

        Raises InputError when not even one evaluation fits the budget.
        """
        per = self.bytes_per_evaluation(batched)
        by_memory = self.memory_budget // per
        if by_memory < 1:
            raise InputError(
                f"memory_budget={self.memory_budget}: one perturbed evaluation of this loss "
                f"needs about {nbytes(per)} (a copy of the perturbed parameters and the loss's "
                f"intermediates), more than the budget of {nbytes(self.memory_budget)}, and "
                "every mode evaluates at least one at a time. Raise memory_budget to at least "
                f"{per} bytes, or pass None for the default (a quarter of the available "
                "memory, 256 MiB to 1 GiB).")
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

    # -- evaluations --------------------------------------------------------------------------
    def at(self):
        if self.per_leaf:  # through the smallest leaf's direction batch (cheap to compile)
            k = int(np.argmin(np.diff(self.sp.offsets)))
            zero = self.vectors(np.zeros((1, self.leaf_size(k))))
            out = self.along(k, zero, [0], [0.0], [0], [0])[0]
        else:
            out = self.perturbed(np.zeros(1, np.int64), np.zeros(1))[0]
        return out if self.vector else float(out)

    def perturbed(self, index, step, deadline: Deadline | None = None) -> np.ndarray:
        """With a `deadline` (mode="auto"), leaves are evaluated largest first and TooSlow is
        raised as soon as a full check is predicted to take too long."""
        index = np.asarray(index, np.int64)
        m = len(index)
        out = np.empty((m, self.out_size) if self.vector else m)
        if m == 0:
            return out
        if not self.per_leaf:
            if deadline is not None:
                deadline.expect(None, m, 1.0)
            out[:] = self._batches("losses_at", _program_losses_at, None, self.sp.n, (),
                                   index, step, deadline=deadline)
            return out
        leaf_of = np.searchsorted(self.sp.offsets, index, side="right") - 1
        leaves = sorted(np.unique(leaf_of), key=lambda k: -self.leaf_size(k))
        if deadline is not None:
            for k in leaves:
                deadline.expect(int(k), int(np.sum(leaf_of == k)), self.leaf_work(int(k)))
        self._precompile([(int(k), int(np.sum(leaf_of == k))) for k in leaves], deadline)
        for done, k in enumerate(leaves):
            sel = leaf_of == k
            if deadline is not None:
                deadline.groups_left = len(leaves) - done - 1
                deadline.current = int(k)
            out[sel] = self.leaf_perturbed(int(k), index[sel] - self.sp.offsets[k], step[sel],
                                           deadline)
        return out

    def leaf_work(self, k: int) -> float:
        """The work of one perturbation of leaf k, relative to the other leaves' (mode="auto"
        predicts from it): every leaf's program evaluates the whole function."""
        del k
        return 1.0

    def leaf_program(self, k: int) -> _LeafProgram:
        """How leaf k's perturbations are evaluated: the dense batched program."""
        return _LeafProgram("losses_at", _program_losses_at)

    def leaf_perturbed(self, k: int, index, step, deadline=None) -> np.ndarray:
        """Perturbations of checked leaf k (indices within the leaf), by its batched program."""
        lp = self.leaf_program(k)
        return self._batches(lp.kind, lp.build, k, self._batched(k, lp), lp.extra, index, step,
                             deadline=deadline, per_bytes=lp.per_bytes, fallback=lp.fallback)

    def _batched(self, k: int, lp: _LeafProgram) -> int:
        """Entries each perturbation of leaf k's program carries: the leaf, or none."""
        return self.leaf_size(k) if lp.copies_leaf else 0

    def _precompile(self, counts: list[tuple[int, int]], deadline: Deadline | None) -> None:
        """Compiles the programs that these (leaf, evaluations) will run, on worker threads.

        Per-leaf programs are otherwise compiled one after the other as the loop reaches each
        leaf, and XLA releases the GIL while it compiles: on W2 (four leaves) compilation is
        most of a full check. Each program is compiled for exactly the first chunk `_chunks`
        will pass it, so the loop then finds it in the program cache. A program that fails here
        (a function that does not vmap, a rule that cannot trace) is left to the loop, which
        handles and reports it. The wall time counts as the deadline's compilation. Not under
        jax.distributed, where every process compiles in the same order.
        """
        jobs = []
        for k, m in counts:
            lp = self.leaf_program(k)
            batched = self._batched(k, lp)
            static = self._static(lp.kind, k, batched)
            chunk, per_device, devices = self._chunk_shape(m, batched, lp.per_bytes)
            if (static, chunk) in self._compiled_chunks:
                continue
            self._compiled_chunks.add((static, chunk))
            empty = self._padded((np.zeros(0, np.int64), np.zeros(0)), chunk)  # index, step
            rows = (*lp.extra, *self._rows(empty, 0, chunk, devices, per_device))
            jobs.append((lp.kind, lp.build, static, rows))
        if len(jobs) < 2 or programs.multiprocess():
            return
        started = time.perf_counter()
        config = programs.thread_config()  # JAX's settings are thread-local: this thread's

        def compile_one(job):
            with programs.configured(config):
                try:
                    self._compile(*job, None)
                except Exception:  # noqa: BLE001 - the loop compiles it again and handles it
                    pass

        with concurrent.futures.ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
            list(pool.map(compile_one, jobs))
        if deadline is not None:
            deadline.compiling += time.perf_counter() - started

    def vectors(self, vectors: np.ndarray):
        out = jax.device_put(np.asarray(vectors, self.dtype))
        if self._sharding is not None:
            out = jax.device_put(out, NamedSharding(self._sharding.mesh, P()))
        return out

    def along(self, k, vectors, vid, mult, lo, hi) -> np.ndarray:
        vid, lo, hi = (np.asarray(a, np.int64) for a in (vid, lo, hi))
        mult = np.asarray(mult, np.float64)
        size = self.sp.n if k is None else self.leaf_size(k)
        return self._batches("losses_along", _program_losses_along, k, size, (vectors,),
                             vid, mult, lo, hi)

    def complex_step(self, index: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Complex-step derivatives Im f(x + i h e_k) / h at the given entries.

        Raises InputError when the loss cannot be evaluated at complex parameters.
        """
        cdtypes = [np.result_type(d, np.complex64) for d in self.dtypes]
        why = ("method='complex' needs a loss that JAX can evaluate at complex parameters, "
               "but it raised {}. Use method='central' (or 'richardson').")
        try:
            traced = programs.trace(self.fn_flat, *self.avals(cdtypes))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - the loss does not accept complex inputs
            advice = promotion_advice(e)  # real data meeting the complex parameters
            raise InputError(why.format(first_line(e))
                             + ("" if advice is None else f"\n  {advice}")) from e
        theta = jax.device_put(self.theta_np.astype(np.result_type(*cdtypes)))
        static = _Static("complex", tuple((a, b, str(dt)) for (a, b, _), dt in
                                          zip(self.segments, cdtypes)), None, False,
                         self.batched, False)
        chunk = max(1, min(MAX_CHUNK_SMALL, 1 << max(0, (len(index) - 1).bit_length())))
        pad = (-len(index)) % chunk
        idx = np.concatenate([index, np.zeros(pad, np.int64)]).astype(INDEX_DTYPE)
        st = np.concatenate([step, np.ones(pad)]).astype(self.dtype)
        consts = [jax.device_put(c) for c in traced.consts]
        out = []
        try:
            for a in range(0, len(idx), chunk):
                rows = (idx[a:a + chunk][None], st[a:a + chunk][None])
                args = (consts, theta, self.dyn, *rows)
                program = programs.compiled("complex", lambda: _program_complex(traced, static),
                                            static, (traced,), args,
                                            work=4 * self.work * len(index))
                out.append(programs.to_host(program(*args)).ravel())
        except Exception as e:  # noqa: BLE001 - the loss does not accept complex inputs
            raise InputError(why.format(first_line(e))) from e
        self.n_evaluations += len(index)
        return np.concatenate(out)[:len(index)].astype(np.float64)

    def fn_flat(self, *flat):
        """The user's function of the trace's flat inputs (a loss's scalar, aux dropped), for
        tracing it afresh."""
        return _traceable(self.fn, self.vector, self.has_aux)(*self.call_args(flat))

    # -- running a batched program in chunks -------------------------------------------------
    def _batches(self, kind, build, leaf, batched: int, extra: tuple, *arrays,
                 deadline: Deadline | None = None, per_bytes: int | None = None,
                 fallback: bool = True, first=None) -> np.ndarray:
        """Runs a batched program over `arrays` (along axis 0) in fixed-size, padded chunks.

        A function that cannot be vmapped (the first compilation fails) is run again one
        perturbation at a time, and `batch_error` says why.
        """
        self.n_evaluations += len(arrays[0])
        static = self._static(kind, leaf, batched)
        try:
            return self._chunks(kind, build, static, batched, extra, arrays, deadline,
                                per_bytes, first)
        except InputError:
            raise
        except _Unbatchable as e:
            if not fallback:  # a structured program: the caller falls back to the dense one
                raise
            self.batched, self.batch_error = False, first_line(e.__cause__)
            static = self._static(kind, leaf, 0)
            return self._chunks(kind, build, static, batched, extra, arrays, deadline)

    def _chunk_shape(self, m: int, batched: int, per_bytes: int | None) -> tuple[int, int, int]:
        """(chunk, per device, devices) of a batched call over m perturbations."""
        per_device = (self.chunk_size(m, batched) if per_bytes is None
                      else structured_chunk(per_bytes, self.memory_budget))
        devices = len(self.devices) if self.batched else 1
        return per_device * devices, per_device, devices

    def _rows(self, padded, s: int, chunk: int, devices: int, per_device: int) -> list:
        """Chunk s..s+chunk of the padded arrays, split over the devices (sharded if several)."""
        parts = [p[s:s + chunk].reshape(devices, per_device, *p.shape[1:]) for p in padded]
        if self._sharding is not None and self.batched:
            parts = [jax.device_put(p, self._sharding) for p in parts]
        return parts

    def _padded(self, arrays, pad: int) -> list[np.ndarray]:
        """The arrays in the programs' dtypes (int32 indices, the check's float dtype), each
        followed by `pad` zero rows."""
        padded = []
        for a in arrays:
            a = np.asarray(a)
            dtype = INDEX_DTYPE if np.issubdtype(a.dtype, np.integer) else self.dtype
            filler = np.zeros((pad, *a.shape[1:]), dtype)
            padded.append(np.concatenate([a.astype(dtype), filler]))
        return padded

    def _chunks(self, kind, build, static, batched, extra, arrays, deadline=None,
                per_bytes: int | None = None, first=None) -> np.ndarray:
        """`first(seconds, chunk)`, if given, is told how long the first chunk ran (it may
        raise to abandon the program: `StructuredEvaluator`'s guard)."""
        m = len(arrays[0])
        chunk, per_device, devices = self._chunk_shape(m, batched, per_bytes)
        pad = (-m) % chunk
        padded = self._padded(arrays, pad)
        out, program = [], None
        bar = self.progress.start(m) if self.progress is not None else None
        if deadline is not None:
            deadline.next_program(deadline.current)
        for s in range(0, m + pad, chunk):
            rows = (*extra, *self._rows(padded, s, chunk, devices, per_device))
            if program is None:
                program = self._compile(kind, build, static, rows, deadline)
            started = time.perf_counter()
            values = programs.to_host(self._run(program, rows))
            seconds = time.perf_counter() - started
            if first is not None and s == 0:
                first(seconds, chunk)
            out.append(values.reshape(chunk, -1) if self.vector else values.ravel())
            if deadline is not None:
                deadline.observe(min(chunk, m - s), chunk, seconds)
            if bar is not None:
                bar.update(min(chunk, m - s))
        if bar is not None:
            bar.close()
        return np.concatenate(out)[:m].astype(np.float64)

    def _run(self, program, rows):
        """One call of a compiled program. An XLA runtime failure is JAX's, not a wrong
        gradient: an InputError that says so (jax.scipy.special.owens_t in float32, after a
        float64 call in the same process, fails the same way under plain jax.jit)."""
        try:
            return program(self.consts, self.theta, self.dyn, *rows)
        except jax.errors.JaxRuntimeError as e:
            what = "f(*primals)" if self.vector else "loss(params, *args)"
            raise InputError(
                f"JAX could not run the compiled {what}: {first_line(e)}. This is a failure of "
                "JAX's runtime, not of any gradient: try the function under plain jax.jit; if it "
                "fails there too, it is a JAX issue.") from e

    def eval_work(self, kind: str, leaf: int | None) -> float:
        """The work of one perturbation of `leaf` (None: any) by a program of `kind`: the
        whole function's on the dense path."""
        del kind, leaf
        return self.work

    def _compile(self, kind, build, static, rows, deadline):
        started = time.perf_counter()
        # Expected work of the program over the check: its entries, each evaluated about
        # EVALS_PER_ENTRY times (2 in a float64 full check, 4 with 2h everywhere in float32,
        # more where refined), at its per-perturbation work.
        size = self.sp.n if static.leaf is None else self.leaf_size(static.leaf)
        work = EVALS_PER_ENTRY * size * self.eval_work(kind, static.leaf)
        try:
            program = programs.compiled(kind, lambda: build(self.traced, static), static,
                                        (self.traced,), (self.consts, self.theta, self.dyn,
                                                         *rows), work=work)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - vmap failed: one at a time
            if not self.batched or forbidden_promotion(e):  # the latter is never vmap's fault:
                raise  # the function traced unbatched, so jgc's own code promoted (a bug)
            raise _Unbatchable() from e
        if deadline is not None:
            deadline.compiling += time.perf_counter() - started
            deadline.compiled += 1
        return program


@dataclasses.dataclass(frozen=True)
class _LeafProgram:
    """How one leaf's perturbations are evaluated: the program's kind and builder, its extra
    inputs, the memory per perturbation that sizes its chunks (None: the dense rule), whether a
    failure to vmap falls back to one perturbation at a time (False: the caller falls back to
    the dense program), and whether each perturbation carries a copy of the leaf (the dense
    program's `batched` entries; the structured program takes only indices and steps)."""

    kind: str
    build: Callable
    extra: tuple = ()
    per_bytes: int | None = None
    fallback: bool = True
    copies_leaf: bool = True


class _Unbatchable(Exception):
    """The batched program could not be built (the function does not vmap); see __cause__."""


class _SlowerThanDense(Exception):
    """A structured program ran slower than the dense one would (its message says by how
    much): the leaf is evaluated densely instead."""


EVALS_PER_ENTRY = 4  # a program's expected evaluations per entry of its leaf (see _compile)


# The structured evaluator (structured.py) for losses with at least this many parameters: below,
# one dense program over the flat vector costs less than compiling a program per leaf.
STRUCTURED_MIN = PER_LEAF_MIN
MAX_CHUNK_STRUCTURED = 256  # its perturbations are cheap: larger chunks amortise each call


def structured_chunk(per_bytes: int, budget: int) -> int:
    """Perturbations per structured call: within the budget, at most MAX_CHUNK_STRUCTURED, and
    the same for every call of a leaf however many perturbations it has, so that the noise
    probes, every stencil and the refinements of one check share one compiled program per leaf.
    Padding a small call to the full chunk costs less than compiling another: a structured
    perturbation costs at most half a forward pass (on W2, 256 of them take 0.1 to 1 ms; a
    compile, 50 to 150 ms)."""
    return max(1, min(MAX_CHUNK_STRUCTURED, budget // max(per_bytes, 1)))


class StructuredEvaluator(DenseEvaluator):
    """The dense evaluator, except that a leaf's one-entry perturbations go through the
    structured pass (structured.py) wherever it does less work: only what each perturbation
    changes is recomputed, and directions in it start from the pass's base values (the
    upstream layers once per check). The complex step stays dense."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.per_leaf = True
        self.flat = None
        self.plans: dict[int, structured.LeafPlan] = {}
        self.bases: dict[int, Any] = {}
        self.failed: dict[int, str] = {}
        self.forward_seconds = math.inf  # one plain forward pass: the base values' program

    def _setup(self) -> None:
        """Plans every leaf (abstract traces, no compilation), then computes the base values
        the structured leaves read, in one forward pass shared by all of them."""
        self.flat = flat = structured.flatten(self.traced.closed)
        for k, (a, b, _) in enumerate(self.segments):
            leaf = jax.ShapeDtypeStruct((b - a,), self.dtype)
            try:
                self.plans[k] = structured.plan_leaf(flat, flat.invars[k], flat.avals, leaf,
                                                     self.dtypes[k])
            except Exception as e:  # noqa: BLE001 - a rule that cannot trace: dense
                if forbidden_promotion(e):  # jgc's own code promoting implicitly: a bug, which
                    raise  # a fallback would hide under the user's strict promotion settings
                self.failed[k] = f"failed: {first_line(e)}"
        needed = tuple(sorted({i for p in self.plans.values() if p.use for i in p.needed}))
        if not needed:
            return
        static = ("structured_base", self.segments, needed)
        program = programs.compiled(
            "structured_base", lambda: _program_base(flat, self.segments, needed), static,
            (self.traced,), (self.consts, self.theta, self.dyn), work=self.work)
        started = time.perf_counter()
        values = jax.block_until_ready(program(self.consts, self.theta, self.dyn))
        self.forward_seconds = time.perf_counter() - started
        self.bases = dict(zip(needed, values))
        for k, plan in self.plans.items():
            why = structured.cancellation(plan, self.bases) if plan.use else None
            if why:
                self.failed[k] = f"was not used: {why}"

    def leaf_work(self, k: int) -> float:
        """The plan's estimate: the structured work, or the whole function's for a dense leaf."""
        if self.flat is None:
            self._setup()
        plan = self.plans.get(k)
        if plan is None or k in self.failed:
            return max((p.dense for p in self.plans.values()), default=1.0)
        return plan.structured if plan.use else plan.dense

    def eval_work(self, kind: str, leaf: int | None) -> float:
        """The structured program's planned work; every other program (directions, the
        complex step, dense leaves) evaluates the whole function."""
        plan = None if leaf is None else self.plans.get(leaf)
        if kind != "structured" or plan is None:
            return self.work
        return plan.structured

    def leaf_program(self, k: int) -> _LeafProgram:
        """The structured program where leaf k has a plan that pays, else the dense one."""
        if self.flat is None:
            self._setup()
        plan = self.plans.get(k)
        if plan is None or not plan.use or k in self.failed:
            return super().leaf_program(k)
        bases = tuple(self.bases[i] for i in plan.needed)
        # Memory per perturbation: its planned work in elements (an upper bound on what it
        # holds: a contraction's work counts its multiply-adds), held about 4 times over (a
        # slab's values, its change, an operand gathered for it, the rule's output), and every
        # value the pass materialises in full for an operation without a rule (a gather from
        # an embedding table makes the table dense, per perturbation), held twice (the value
        # and the primitive's output of its size).
        per_bytes = int((4 * max(plan.structured, 1) + 2 * plan.materialized)
                        * self.dtype.itemsize)
        return _LeafProgram("structured", lambda traced, st: _program_structured(
            self.flat, plan, self.segments, k, self.dtypes[k]), (bases,), per_bytes, False,
            copies_leaf=False)

    def leaf_perturbed(self, k: int, index, step, deadline=None) -> np.ndarray:
        lp = self.leaf_program(k)
        if lp.kind != "structured":
            return super().leaf_perturbed(k, index, step, deadline)
        try:
            return self._batches(lp.kind, lp.build, k, self._batched(k, lp), lp.extra, index,
                                 step, deadline=deadline, per_bytes=lp.per_bytes,
                                 fallback=lp.fallback, first=self._guard(k))
        except InputError:
            raise
        except (_Unbatchable, _SlowerThanDense) as e:  # the dense program, and a note
            self.failed[k] = (f"failed: {first_line(e.__cause__)}"
                              if isinstance(e, _Unbatchable) else f"was abandoned: {e}")
            self.n_evaluations -= len(index)  # counted again by the dense program
            return super().leaf_perturbed(k, index, step, deadline)

    def _guard(self, k: int):
        """After the first chunk of leaf k's structured program: abandon it (`_SlowerThanDense`)
        when it took longer per perturbation than one plain forward pass, what a dense
        evaluation costs at least. The plan weighs counted work, which an operation slow on
        this backend can belie; so the structured pass is never slower than the dense one by
        more than that one chunk (and its compilation)."""
        def check(seconds: float, chunk: int) -> None:
            if seconds / chunk > self.forward_seconds:
                raise _SlowerThanDense(
                    f"it ran {seconds / chunk * 1e3:.3g} ms per perturbation, more than a "
                    f"whole forward pass ({self.forward_seconds * 1e3:.3g} ms)")
        return check

    def along(self, k, vectors, vid, mult, lo, hi) -> np.ndarray:
        """Directions in leaf k from the structured pass's base values where the leaf has a
        plan: the upstream layers are computed once per check, not once per call (group
        testing makes a hundred small calls on a large leaf)."""
        if self.flat is None:
            self._setup()
        plan = None if k is None else self.plans.get(k)
        if plan is None or not plan.use or k in self.failed:
            return super().along(k, vectors, vid, mult, lo, hi)
        bases = tuple(self.bases[i] for i in plan.needed)
        vid, lo, hi = (np.asarray(x, np.int64) for x in (vid, lo, hi))
        mult = np.asarray(mult, np.float64)
        try:
            return self._batches(
                "structured_along", lambda traced, st: _program_structured_along(
                    self.flat, plan, self.segments, k, self.dtypes[k], st), k,
                self.leaf_size(k), (bases, vectors), vid, mult, lo, hi, fallback=False)
        except InputError:
            raise
        except _Unbatchable as e:  # a rule this loss defeats: the dense program, and a note
            self.failed[k] = f"failed: {first_line(e.__cause__)}"
            self.n_evaluations -= len(vid)  # counted again by the dense program
            return super().along(k, vectors, vid, mult, lo, hi)

    def strategy_note(self) -> str:
        specs = self.sp.checked_specs()
        plans = {specs[k].path or "<params>": p for k, p in self.plans.items()
                 if k not in self.failed}
        text = structured.describe(plans) if plans else ""
        if self.failed:
            names = [specs[k].path or "<params>" for k in self.failed]
            text += ("; " if text else "") + (
                f"dense evaluation for {', '.join(names[:4])} (the structured pass "
                f"{next(iter(self.failed.values()))})")
        return text


def _program_base(flat, segments, needed):
    def run(consts, theta, dynamic):
        parts = [theta[a:b].astype(dt) for a, b, dt in segments]
        return structured.base_values(flat, (*parts, *dynamic), consts, needed)

    return run


def _program_structured(flat, plan, segments, k: int, dtype):
    a, b, _ = segments[k]

    def run(consts, theta, dynamic, bases, index, step):
        del consts, dynamic  # everything the pass reads is in `bases`
        leaf = theta[a:b]

        def per_device(i, s):
            out = structured.leaf_losses(flat, list(plan.eqns), flat.invars[k], plan.needed,
                                         bases, leaf, i, s, dtype)
            return out[:, 0]

        return jax.vmap(per_device)(index, step)

    return run


def _program_structured_along(flat, plan, segments, k: int, dtype, st: _Static):
    """As _program_losses_along for leaf k, from the leaf-independent base values: only the
    equations that depend on the leaf run per direction (the layers upstream of it once per
    check, not once per call)."""
    a, b, _ = segments[k]

    def run(consts, theta, dynamic, bases, vectors, vid, mult, lo, hi):
        del consts, dynamic  # everything the pass reads is in `bases`
        leaf = theta[a:b]
        positions = jnp.arange(b - a, dtype=INDEX_DTYPE)

        def one(v, c, lo_, hi_):
            value = _displaced(leaf, positions, vectors, v, c, lo_, hi_).astype(dtype)
            return structured.leaf_losses_dense(flat, list(plan.eqns), flat.invars[k],
                                                plan.needed, bases, value[None])[0, 0]

        return _map(one, (vid, mult, lo, hi), st.sequential, st.batched)

    return run


def _traceable(fn: Callable, vector: bool, has_aux: bool) -> Callable:
    """The function as traced: a loss's scalar (aux dropped), or a vector function's outputs
    (flattened into one vector by the programs)."""
    if vector:
        return fn
    return lambda *a: loss_value(fn(*a), has_aux)


def make_evaluator(fn: Callable, sp: Split, theta: np.ndarray, dtypes, args: tuple, *,
                   vector: bool = False, has_aux: bool = False,
                   memory_budget: int | None = None, progress=None,
                   name: str = "loss") -> Evaluator:
    """The strategy for this function: dense (JAX traces it) or host (it converts to NumPy).

    The function is traced once, here (no compilation). A loss is checked to return a real
    scalar; an InputError from the function (a pair without has_aux, say) is refused, and any
    other tracing failure means the function is not JAX code: the host loop evaluates it.
    Except an implicit promotion that the user's JAX configuration forbids (strict rank or
    dtype promotion): in JAX code that is the user's error, refused naming `name` (the host
    loop would hide it, or run a JAX loss eagerly); code that uses NumPy alone still runs on
    the host, with NumPy's promotion, as it runs for the user.
    """
    layout, dynamic = make_layout(sp, dtypes, args)
    avals = [jax.ShapeDtypeStruct((sp.offsets[k + 1] - sp.offsets[k],), dt)
             for k, dt in enumerate(dtypes)]
    traceable = _traceable(fn, vector, has_aux)

    def flat_fn(*flat):
        k, n_p = len(avals), len(dynamic[0])
        params, rest = assemble(layout, flat[:k], (flat[k:k + n_p], flat[k + n_p:]), cast=False)
        return traceable(params, *rest)

    try:
        traced = programs.trace(flat_fn, *avals, *dynamic[0], *dynamic[1])
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use the host loop.
        refused = None if numpy_code(fn) else promotion_refused(name, e)
        if refused is not None:
            raise refused from e
        return HostEvaluator(fn, sp, theta, dtypes, args, vector=vector, has_aux=has_aux,
                             trace_error=first_line(e))
    if not vector:
        (out,) = traced.closed.out_avals
        check_scalar(out.shape, out.dtype)
    kind = DenseEvaluator
    # float64 evaluation only, for now: in float32 (x64=False) on the Flax MNIST CNN, the
    # structured pass's rounding at relu kinks moved the largest conv-kernel entry's D(h) 2.8
    # error bars from the truth, and the leaf-level test missed a 1% bug that the dense path
    # catches. Until that is understood, reduced precision stays dense.
    if (not vector and sp.n >= STRUCTURED_MIN and os.environ.get("JGC_STRUCTURED", "1") != "0"
            and all(np.dtype(d) == np.float64 for d in dtypes)):
        kind = StructuredEvaluator
    return kind(fn, sp, theta, dtypes, args, traced=traced, vector=vector, has_aux=has_aux,
                memory_budget=memory_budget, progress=progress)


def _copy_arrays(tree):
    """NumPy copies of the array leaves, so a host function cannot mutate the user's arrays. A
    typed PRNG key has no NumPy form: it is passed as it is (JAX arrays are immutable)."""
    def copy(x):
        if not _is_array(x) or jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            return x
        return np.array(x)

    return jax.tree_util.tree_map(copy, tree)
