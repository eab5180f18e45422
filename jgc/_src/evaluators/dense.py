"""The dense strategy: the function traced once, batched with jit+vmap over chunks of perturbations
and sharded over jax.devices().
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jgc._src.evaluators import programs
from jgc._src.evaluators.budget import (
    activation_bytes,
    agreed_budget,
    default_memory_budget,
    nbytes,
    structured_chunk,
)
from jgc._src.evaluators.builders import (
    INDEX_DTYPE,
    _program_complex,
    _program_losses_along,
    _program_losses_at,
    _Static,
)
from jgc._src.evaluators.calls import first_line, forbidden_promotion, promotion_advice
from jgc._src.evaluators.deadline import Deadline
from jgc._src.evaluators.evaluator import Evaluator
from jgc._src.evaluators.layout import as_traced, assemble
from jgc._src.evaluators.structured.flatjaxpr import jaxpr_cost
from jgc._src.stages.split import InputError

# Perturbations per compiled call. Measured on 2 CPU cores: 32 to 64 per chunk runs best for
# large leaves; more only grows the (chunk x n) perturbation matrix. Small problems take larger
# chunks, which cuts the per-call dispatch overhead that dominates them.
MAX_CHUNK = 64
MAX_CHUNK_SMALL = 512
MIN_CHUNK = 2


SMALL_BATCHED = 4096  # "small": at most this many batched parameters per perturbation
# From this many parameters on, each leaf gets its own batched function (a compile each), so that
# computation not depending on the perturbed leaf is done once per batch instead of per
# perturbation. Below it, one function over the flat vector (a single compile) is cheaper.
PER_LEAF_MIN = 20_000


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
        # The work of one evaluation (flatjaxpr._cost's units), for the XLA options
        # (xla.light); infinite with a while loop (unknown trips): fully optimised.
        self.work = jaxpr_cost(traced.closed)
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

    def _on_one_device(self) -> None:
        """Puts theta, the fixed leaves and the constants back on one device, for programs that
        run one perturbation at a time. Replicated over several devices, such a program is
        partitioned over all of them, and a host callback inside it (the reason it cannot be
        vmapped) left XLA's all-reduce waiting for a device that never arrived: a deadlock."""
        self._sharding = None
        device = jax.local_devices()[0]  # this process's own, under jax.distributed too
        self.theta = jax.device_put(self.theta_np, device)
        self.dyn = tuple(jax.device_put(x, device) for x in (*self.dynamic[0], *self.dynamic[1]))
        self.consts = [jax.device_put(c, device) for c in self.traced.consts]

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
        return as_traced(self.fn, self.vector, self.has_aux)(*self.call_args(flat))

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
            self._on_one_device()
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
        # One call in flight while the next chunk's rows are made and dispatched: JAX runs a
        # call asynchronously, and waiting for each before preparing the next left the device
        # idle for the Python in between (W2: 392 chunks of 256, about a fifth of the check).
        # The first chunk runs alone, so that `first` times it by itself.
        pending = None
        started = time.perf_counter()

        def finish(call, s):
            nonlocal started
            values = programs.to_host(call)
            seconds, started = time.perf_counter() - started, time.perf_counter()
            if first is not None and s == 0:
                first(seconds, chunk)
            out.append(values.reshape(chunk, -1) if self.vector else values.ravel())
            if deadline is not None:
                deadline.observe(min(chunk, m - s), chunk, seconds)
            if bar is not None:
                bar.update(min(chunk, m - s))

        for s in range(0, m + pad, chunk):
            rows = (*extra, *self._rows(padded, s, chunk, devices, per_device))
            if program is None:
                program = self._compile(kind, build, static, rows, deadline)
                started = time.perf_counter()
            call = self._run(program, rows)
            if pending is not None:
                finish(*pending)
            pending = (call, s)
            if s == 0:
                finish(*pending)
                pending = None
        if pending is not None:
            finish(*pending)
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
