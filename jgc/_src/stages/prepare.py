"""The carrier every surface builds first: split -> plan -> evaluate, and what is checked at f0.

check_grad, check_vjp, check_jvp, check_hvp and numerical_grad each describe what they check as
a `Subject` (the function jgc evaluates at perturbed points, the tree it perturbs, the arguments
it passes unchanged, and any direction the user chose) and call `prepare`, which returns the
frozen `Check` every later stage reads. What `prepare` guarantees therefore holds on every
surface by construction:

* inputs are refused the same way: tracers, deleted arrays, a tree with nothing to check, a
  direction (tangent, cotangent) that is zero or not finite, which would verify nothing;
* arguments are promoted with the parameters under x64, and the report states the precision
  the check ran in, and the user's own (`Precision`);
* the function is finite at the unperturbed point (else the error names the non-finite inputs),
  and evaluating it twice gives the same value (else the check reports hidden randomness
  instead of judging anything).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src import compat
from jgc._src.evaluators import programs
from jgc._src.evaluators.evaluator import Evaluator
from jgc._src.evaluators.factory import make_evaluator
from jgc._src.evaluators.progress import progress_factory
from jgc._src.report.report import Report
from jgc._src.report.vocab import EvaluatorChoice, Method
from jgc._src.stages import compare as cp
from jgc._src.stages import complexstep
from jgc._src.stages import estimate as es
from jgc._src.stages import plan as pl
from jgc._src.stages.inputs import promote_args, refuse_unusable
from jgc._src.stages.split import InputError, Split, listing, split_checked
from jgc._src.surfaces.options import Options


@dataclasses.dataclass(frozen=True)
class Precision:
    """The precision a check runs in, and the user's own.

    `effective`: JAX's x64 flag during the check (thread-local: every worker thread of the check
    runs under it). `user`: the flag as the caller had it, which their model runs under.
    `promotion`: the caller's rank and dtype promotion modes, thread-local too, which every
    worker thread shares (jgc never changes them).
    """

    effective: bool
    user: bool
    promotion: tuple[str, str]

    def run(self, fn: Callable, *args, own: bool = False):
        """fn(*args) under the check's precision (or, with `own`, the user's), on any thread."""
        with programs.configured((self.user if own else self.effective, *self.promotion)):
            return fn(*args)


@contextlib.contextmanager
def precision(x64: bool) -> Iterator[Precision]:
    """Float64 for the duration of a check (x64=True), restored afterwards even on error.

    `jax.enable_x64` is a context manager over the config option: on exit it restores the value
    it found, whether the body returned or raised (KeyboardInterrupt included).
    """
    if not isinstance(x64, bool):
        raise InputError(f"x64={x64!r}: expected True (check in float64, the default) or False "
                         "(check at the parameters' own precision).")
    user, *promotion = programs.thread_config()
    effective = True if x64 else user
    with compat.enable_x64(effective):
        yield Precision(effective, user, tuple(promotion))


@dataclasses.dataclass(frozen=True)
class Subject:
    """What a surface checks, before anything is evaluated.

    Attributes:
      fn: the function jgc evaluates at perturbed points: `loss(params, *args) -> scalar`, or
        with `vector`, any `F(params, *args)` returning arrays (check_jvp's f, check_hvp's
        gradient), whose outputs are compared element by element.
      params: the tree that is perturbed. args: passed to fn unchanged, never perturbed.
      name: the perturbed tree's name in messages ("params", "primals").
      fn_name: how fn is named in messages ("loss", "f(*primals)").
      given: other user trees the check reads, refused like params when unusable.
      directions: user-chosen directions (a tangent, a cotangent), as (name, tree): each must
        hold a finite, nonzero entry, or the check would verify nothing along it.
      f_scale: a magnitude of the loss's terms, when known (check_vjp's contraction).
      has_aux: the loss returns (value, aux).
    """

    fn: Callable
    params: Any
    args: tuple = ()
    vector: bool = False
    name: str = "params"
    fn_name: str = "loss"
    given: tuple[tuple[str, Any], ...] = ()
    directions: tuple[tuple[str, Any], ...] = ()
    f_scale: float = 0.0
    has_aux: bool = False


@dataclasses.dataclass(frozen=True)
class Check:
    """The carrier: everything the stages of one check share."""

    subject: Subject
    sp: Split
    plan: pl.Plan
    ev: Evaluator
    f0: Any  # a float (a loss) or a flat vector (check_jvp, check_hvp)
    options: Options
    precision: Precision
    start: float
    notes: tuple[str, ...] = ()
    u: float = 0.0  # unit roundoff: the coarser of the parameters' and the function's dtype
    float64: bool = True
    promoted: tuple[str, ...] = ()  # what x64 promoted (leaves and arguments), with dtypes
    sigma: float | None = None  # the loss's measured noise level
    side: Any = None  # what ran alongside f0 (`prepare`'s `alongside`)

    def note(self, *lines: str) -> Check:
        return dataclasses.replace(self, notes=(*self.notes, *lines))

    @property
    def full_stencils(self) -> bool:
        """2h at every entry: the leaf-level test (reduced precision) and Richardson need it."""
        m = self.options.method
        return m == Method.RICHARDSON or (not self.float64 and m != Method.COMPLEX)

    @property
    def schedule(self) -> es.Schedule:
        o = self.options
        return es.Schedule(o.method, everywhere=self.full_stencils, refine=o.refine,
                           rtol=o.rtol, atol=o.atol)

    @property
    def precision_name(self) -> str:
        """The evaluation dtypes, e.g. 'float64 (x64)'; a complex leaf's as complex128."""
        names = sorted({str(np.result_type(d, np.complex64) if s.is_complex else d)
                        for d, s in zip(self.plan.dtypes, self.sp.checked_specs())})
        return "/".join(names) + (" (x64)" if self.plan.x64 else "")

    def header(self, source: str, method: str, mode: str, autodiff: str = "jax.grad",
               noun: str = "gradient", n_params: int | None = None) -> cp.Header:
        return cp.Header(source, self.precision_name, method, mode, self.plan.step_rule,
                         self.sp.n if n_params is None else n_params, autodiff, noun)


def prepare(subject: Subject, o: Options, prec: Precision,
            alongside: tuple[Callable[[Evaluator], Any], ...] = ()) -> Check | Report:
    """split -> plan -> evaluate, and f0: the carrier, or a Report when the function is random.

    Each of `alongside` (functions of the evaluator) runs on a worker thread of its own, under
    the check's precision, while f0 is computed (check_grad compiles jax.grad and the user's
    gradient there: XLA releases the GIL, and on a small problem compilation is most of the
    time); their results are `Check.side`. Under jax.distributed they run after f0 instead:
    every process must reach the same collectives in the same order.
    """
    start = time.perf_counter()
    refuse_unusable(**{subject.name: subject.params, "args": subject.args},
                    **dict(subject.given), **dict(subject.directions))
    for name, tree in subject.directions:
        refuse_void_direction(name, tree)
    sp = split_checked(subject.params, subject.name)
    if o.method == Method.COMPLEX:
        complexstep.refuse_complex_leaves(sp)
    plan = pl.make_plan(sp, mode=o.mode, x64=o.x64, eps=o.eps, samples=o.samples, seed=o.seed,
                        method=o.method)
    args, promoted_args = promote_args(subject.args, o.x64)
    promoted = tuple(_promoted_leaves(sp, plan) + promoted_args)
    notes = _input_notes(sp, o, promoted_args)
    ev = make_evaluator(subject.fn, sp, plan.theta, plan.dtypes, args, vector=subject.vector,
                        has_aux=subject.has_aux, memory_budget=o.memory_budget,
                        progress=progress_factory(o.progress), name=subject.fn_name,
                        structured=o.evaluator == EvaluatorChoice.AUTO)
    if not ev.traceable:
        notes.append(f"{subject.fn_name} is not traceable by JAX (it converts to NumPy), so jgc "
                     "evaluated it on the host, one perturbation at a time")
    f0, side = _f0_alongside(ev, alongside, prec)
    if ev.batch_error:
        notes.append(f"{subject.fn_name} cannot be vmapped ({ev.batch_error}), so jgc evaluated "
                     "the perturbations one at a time inside the compiled program: the slower "
                     "path")
    _refuse_not_finite(subject, f0, args)
    u = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))
    check = Check(subject, sp, plan, ev, f0, o, prec, start, tuple(notes), u,
                  u <= pl.machine_eps(np.float64), promoted, side=side)
    f0_again = ev.at()
    if not np.array_equal(np.asarray(f0_again), np.asarray(f0)):
        return cp.randomness_report(sp, check.header("-", "-", plan.mode), f0, f0_again,
                                    n_evaluations=ev.n_evaluations, start=start, notes=notes)
    return check


def refuse_void_direction(name: str, tree) -> None:
    """A direction must be finite and not all zero: along a zero direction every derivative is
    zero, whatever the rule says, so the check would verify nothing."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "shape") and not isinstance(leaf, (int, float, complex)):
            continue
        a = np.asarray(leaf)
        if not jnp.issubdtype(a.dtype, jnp.number):
            continue
        if not np.all(np.isfinite(a)):
            bad = int(np.sum(~np.isfinite(a)))
            raise InputError(f"{name}{jax.tree_util.keystr(path)} has {bad} non-finite entr"
                             f"{'y' if bad == 1 else 'ies'}: a direction must be finite. Pass "
                             f"finite values, or {name}=None to draw a seeded random one.")
        total += int(np.count_nonzero(a))
    if total == 0:
        raise InputError(f"{name} is zero everywhere: along a zero direction every derivative is "
                         "zero whatever the rule computes, so the check would verify nothing. "
                         f"Pass a nonzero {name}, or {name}=None to draw a seeded random one.")


def _promoted_leaves(sp: Split, plan: pl.Plan) -> list[str]:
    """The checked leaves evaluated in a wider dtype than their own (x64), with their dtype."""
    out = []
    for spec, dt in zip(sp.checked_specs(), plan.dtypes):
        own = jnp.finfo(np.dtype(spec.dtype)).dtype if spec.dtype else None
        if own is not None and np.dtype(own).itemsize < np.dtype(dt).itemsize:
            out.append(f"{spec.path or '<params>'} ({spec.dtype})")
    return out


def _input_notes(sp: Split, o: Options, promoted_args: list[str]) -> list[str]:
    notes = []
    unmoved = [(s.path or "<params>", int(np.sum(~sp.finite(k))))
               for k, s in enumerate(sp.checked_specs())]
    unmoved = [(p, n) for p, n in unmoved if n]
    if unmoved:
        notes.append("not checked: " + listing([f"{n} non-finite entr{'y' if n == 1 else 'ies'} "
                                                f"of {p}" for p, n in unmoved], 4)
                     + " (NaN or Inf in the parameters, which the loss leaves out, since it is "
                     "finite at them; a step cannot move such an entry)")
    complex_leaves = sp.complex_paths()
    if complex_leaves:
        notes.append(f"complex: {listing(complex_leaves, 4)} checked along the real and "
                     "the imaginary direction of each entry (each counts as two checked "
                     "entries), and compared in JAX's convention ∂f/∂x − i·∂f/∂y, as jax.grad "
                     "returns it")
    half = [s.path or "<params>" for s in sp.checked_specs() if s.dtype in pl.HALF]
    if half and not o.x64:
        notes.append(f"{', '.join(half)} {'is' if len(half) == 1 else 'are'} half precision: "
                     "evaluated in float32, since differences of a half-precision loss are "
                     "mostly rounding noise (~3 digits)")
    if promoted_args:
        notes.append(f"x64: floating-point arguments were promoted to float64 with the "
                     f"parameters ({listing(promoted_args, 4)}); pass x64=False to check at "
                     "their own precision")
    return notes


def _f0_alongside(ev: Evaluator, alongside: tuple, prec: Precision):
    """f0, with each of `alongside` on a worker thread meanwhile (see `prepare`)."""
    if not alongside or programs.multiprocess():
        f0 = ev.at()
        return f0, tuple(fn(ev) for fn in alongside)
    with concurrent.futures.ThreadPoolExecutor(len(alongside)) as pool:
        jobs = [pool.submit(prec.run, fn, ev) for fn in alongside]
        f0 = ev.at()
        return f0, tuple(job.result() for job in jobs)


def _refuse_not_finite(subject: Subject, f0, args) -> None:
    values = np.asarray(f0, np.float64)
    if np.all(np.isfinite(values)):
        return
    where = where_not_finite(((subject.name, subject.params), ("args", args)),
                             subject.fn_name)
    if values.ndim == 0:
        raise InputError(f"the {subject.fn_name} is {float(values)} at {subject.name} (before "
                         f"any perturbation). {where}jgc needs a finite {subject.fn_name} to "
                         "compare gradients.")
    bad = int(np.sum(~np.isfinite(values)))
    raise InputError(f"{subject.fn_name} has {bad} non-finite output entr"
                     f"{'y' if bad == 1 else 'ies'} of {values.size} at {subject.name} (before "
                     f"any perturbation). {where}jgc needs finite outputs to compare derivatives.")


def where_not_finite(trees, fn_name: str = "loss") -> str:
    """Names the inputs holding NaN or Inf, or says that they are all finite."""
    bad = []
    for name, tree in trees:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            a = np.asarray(leaf) if hasattr(leaf, "shape") or isinstance(leaf, float) else None
            if a is not None and jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(a).all():
                n = int((~np.isfinite(a)).sum())
                bad.append(f"{name}{jax.tree_util.keystr(path)} ({n} non-finite entr"
                           f"{'y' if n == 1 else 'ies'})")
    if bad:
        return f"The inputs are not finite: {', '.join(bad[:5])}. Fix or filter them first; "
    the = fn_name if fn_name.startswith(("f(", "grad(", "the ")) else f"the {fn_name}"
    return (f"Every input is finite, so {the} itself produces it (log or division at 0, an "
            "overflow in exp): check the initialisation and the data scale; ")
