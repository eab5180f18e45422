"""A gradient check, end to end: split -> plan -> evaluate -> estimate -> compare -> diagnose.

`prepare` builds the carrier, a frozen `Check` holding what every later stage shares: the split,
the plan, the evaluator (one trace of the loss), f0, the gradients being compared, the measured
noise and the options. Each later stage is a plain function of it, returning a new Check or its
own results; nothing flows back up. `run` is the whole check as those stage calls.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from jgc._src import calls, complexstep, explain, noise, programs
from jgc._src import compare as cp
from jgc._src import diagnose as dg
from jgc._src import directional as dr
from jgc._src import estimate as es
from jgc._src import plan as pl
from jgc._src.evaluate import Deadline, Evaluator, TooSlow, make_evaluator
from jgc._src.inputs import Options, in_precision, promote_args, refuse_unusable
from jgc._src.probes import Coordinates
from jgc._src.progress import progress_factory
from jgc._src.report import Report
from jgc._src.tree import InputError, Split, complex_value, listing, match_gradient, split_checked
from jgc._src.vocab import Method, Mode


@dataclasses.dataclass(frozen=True)
class Gradients:
    """The gradients a check compares, per checked leaf."""

    checked: tuple[np.ndarray, ...]  # in the gradient's own dtype (its rounding counts)
    autodiff: tuple[np.ndarray, ...] | None  # jax.grad as a third opinion, when it is one
    source: str  # "hand-written", "jax.grad", ...
    autodiff_why: str | None  # why jax.grad is unavailable
    is_autodiff: bool  # the checked gradient is jax.grad itself (grad=None)
    call: calls.GradientCall | None = None


@dataclasses.dataclass(frozen=True)
class Check:
    """The carrier: everything the stages of one check share."""

    sp: Split
    plan: pl.Plan
    ev: Evaluator
    f0: float
    gradients: Gradients
    options: Options
    start: float
    notes: tuple[str, ...] = ()
    sigma: float | None = None  # the loss's measured noise level
    u: float = 0.0  # unit roundoff: the coarser of the parameters' and the loss's dtype
    float64: bool = True

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


def run(loss: Callable, params, args: tuple, grad, options: Options) -> Report:
    """The whole check. Pure: builds copies, never touches the user's arrays or config."""
    check = prepare(loss, params, args, grad, options)
    if isinstance(check, Report):  # hidden randomness: nothing can be judged
        return check
    check = measure_noise(choose_entries(check))
    check, found, outcomes = measure(check)
    leaves, agrees = leaf_reports(check, found, outcomes)
    verdict, text = explain.diagnosis(
        leaves, agrees, source=check.gradients.source,
        has_autodiff=check.gradients.autodiff is not None or check.gradients.is_autodiff,
        autodiff_why=check.gradients.autodiff_why, batch=batch_size(args),
        eps=options.eps, float64=check.float64, method=options.method)
    check, text = closing_notes(check, found, text)
    return cp.build_report(leaves, verdict, text, header(check), n_checked=len(found.g),
                           n_evaluations=check.ev.n_evaluations, start=check.start,
                           notes=check.notes, noise=check.sigma,
                           global_rel=cp.global_rel_error(found.g, found.model.value))


def prepare(loss: Callable, params, args: tuple, grad, o: Options) -> Check | Report:
    """split -> plan -> evaluate: the carrier, with f0 and the gradients being compared."""
    start = time.perf_counter()
    calls.require_function(loss)
    refuse_unusable(params=params, args=args, grad=grad)
    sp = split_checked(params)
    if o.method == Method.COMPLEX:
        complexstep.refuse_complex_leaves(sp)
    plan = pl.make_plan(sp, mode=o.mode, x64=o.x64, eps=o.eps, samples=o.samples, seed=o.seed,
                        method=o.method)
    notes = []
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
    args, promoted = promote_args(args, o.x64)
    if promoted:
        notes.append(f"x64: floating-point arguments were promoted to float64 with the "
                     f"parameters ({listing(promoted, 4)}); pass x64=False to check at "
                     "their own precision")
    ev = make_evaluator(loss, sp, plan.theta, plan.dtypes, args, has_aux=o.has_aux,
                        memory_budget=o.memory_budget, progress=progress_factory(o.progress))
    if not ev.traceable:
        notes.append("the loss is not traceable by JAX (it converts to NumPy), so jgc "
                     "evaluated it on the host, one perturbation at a time")
    f0, gradients = _f0_and_gradients(ev, sp, params, grad, o)
    if ev.batch_error:
        notes.append(f"the loss cannot be vmapped ({ev.batch_error}), so jgc evaluated the "
                     "perturbations one at a time inside the compiled program: the slower path")
    if gradients.call is not None and gradients.call.note:
        notes.append(gradients.call.note)
    if not np.isfinite(f0):
        raise InputError(f"the loss is {f0} at params (before any perturbation). "
                         f"{_where_not_finite(params, args)}jgc needs a finite loss to compare "
                         "gradients.")
    f0_again = ev.at()
    check = Check(sp, plan, ev, f0, gradients, o, start, tuple(notes))
    if f0_again != f0:
        return cp.randomness_report(sp, header(check), f0, f0_again,
                                    n_evaluations=ev.n_evaluations, start=start, notes=notes)
    u = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))
    return dataclasses.replace(check, u=u, float64=u <= pl.machine_eps(np.float64))


def _f0_and_gradients(ev: Evaluator, sp: Split, params, grad, o: Options):
    """f0 here while jax.grad and the user's gradient compile on other threads: XLA releases
    the GIL, and on a small problem compilation is most of the time. Each thread runs under the
    check's effective precision (JAX's x64 flag is thread-local). Under jax.distributed they
    run one after the other: every process must reach the same collectives in the same order."""
    if programs.multiprocess():
        autodiff, why, error = calls.autodiff(ev)
        call = calls.call_gradient(ev, grad) if calls.is_function(grad) else None
        f0 = ev.at()
    else:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            autodiff_job = pool.submit(in_precision, o.effective_x64, calls.autodiff, ev)
            grad_job = (pool.submit(in_precision, o.effective_x64, calls.call_gradient, ev,
                                    grad) if calls.is_function(grad) else None)
            f0 = ev.at()
            autodiff, why, error = autodiff_job.result()
            call = None if grad_job is None else grad_job.result()
    leaves = None if autodiff is None else tuple(_to_leaves(sp, autodiff))
    if grad is None:
        if autodiff is None:
            jaxpr = ev.traced.closed.jaxpr if ev.traceable else None
            raise calls.autodiff_failure(why, error, jaxpr) from error
        return f0, Gradients(leaves, None, "jax.grad", why, True)
    given = (calls.without_aux(call.out, sp, params, o.has_aux) if call is not None else grad)
    checked = match_gradient(given, sp, params,
                             "grad(params, *args)" if call is not None else "grad")
    return f0, Gradients(tuple(checked), leaves, o.source, why, False, call)


def _to_leaves(sp: Split, flat: np.ndarray) -> list[np.ndarray]:
    """A flat vector over the checked leaves, cut into their real views."""
    return [flat[sp.offsets[k]:sp.offsets[k + 1]].reshape(sp.specs[i].view_shape)
            for k, i in enumerate(sp.checked)]


def choose_entries(check: Check) -> Check:
    """The entries a sample checks (a quarter of them the gradient's largest), chosen before the
    noise is measured, whose probes sit at planned entries; a host loop has no faster mode
    than a full check, so "auto" is full there."""
    sp, o, plan = check.sp, check.options, check.plan
    if plan.mode == Mode.SAMPLE:
        plan = dataclasses.replace(plan, entries=tuple(
            pl.sample_entries(sp, o.samples, o.seed, check.gradients.checked)))
    if plan.mode == Mode.AUTO and not check.ev.traceable:
        plan = dataclasses.replace(plan, mode=Mode.FULL)
    return dataclasses.replace(check, plan=plan)


def measure_noise(check: Check) -> Check:
    """The loss's noise; the step follows it where it exceeds the dtype's rounding."""
    sigma = noise.measure(check.ev, check.sp, check.plan)
    plan = check.plan
    if sigma is not None:
        g = check.gradients
        plan = pl.with_noise(plan, sigma / noise.variation(
            check.f0, check.options.f_scale, plan.theta, g.autodiff or g.checked))
    return dataclasses.replace(check, sigma=sigma, plan=plan)


def measure(check: Check) -> tuple[Check, cp.Compared, dict]:
    """The derivative at the planned probes, by mode: every entry, a sample, or directions and
    group testing (auto: a full check unless its first stencil predicts too long a one)."""
    sp, o, g = check.sp, check.options, check.gradients
    plan = check.plan
    if plan.mode == Mode.AUTO:
        factor = 3.0 if o.method == Method.RICHARDSON else 2.0 if check.full_stencils else 1.25
        deadline = Deadline(pl.AUTO_SECONDS, factor, len(sp.checked))
        try:
            full = dataclasses.replace(check, plan=dataclasses.replace(plan, mode=Mode.FULL))
            return full, coordinate_phase(full, deadline), {}
        except TooSlow as e:
            check = dataclasses.replace(check, plan=dataclasses.replace(
                plan, mode=Mode.DIRECTIONAL,
                entries=tuple(pl.sample_entries(sp, o.samples, o.seed, g.checked))))
            check = check.note(
                f"auto: a full check would take about {_duration(e.predicted)} "
                f"({factor * sp.n * 2:,.0f} evaluations at the measured "
                f"{e.per_eval * 1e3:.2g} ms each on average, after compilation), so jgc tested "
                "random directions in every leaf, located any wrong entry by group testing, and "
                f"checked a sample of up to {o.samples} entries per leaf; mode='full' checks "
                "every entry")
    outcomes = {}
    if check.plan.mode == Mode.DIRECTIONAL:
        check, outcomes = directional_phase(check)
    return check, coordinate_phase(check), outcomes


def coordinate_phase(check: Check, deadline: Deadline | None = None) -> cp.Compared:
    """Every planned entry, one by one: the stencil schedule, or the complex step."""
    sp, plan, g, o = check.sp, check.plan, check.gradients, check.options
    checked = cp.restricted(plan, list(g.checked))
    g_round = cp.restricted_rounding(plan, list(g.checked))
    g_ad = None if g.autodiff is None else cp.restricted(plan, list(g.autodiff))
    ad_round = 0.0 if g_ad is None else cp.restricted_rounding(plan, list(g.autodiff))
    if o.method == Method.COMPLEX:
        model = complexstep.model(check.ev, sp, plan, check.f0, check.sigma, check.u,
                                  check.float64, o.f_scale, o.seed)
        cmp = es.compare(checked, model, o.rtol, o.atol, g_round)
        cmp_ad = None if g_ad is None else es.compare(g_ad, model, o.rtol, o.atol, ad_round)
        return cp.compared(model, cmp, cmp_ad, checked, g_round, g_ad, ad_round, o.rtol,
                           o.atol)
    probes = Coordinates(check.ev, sp, plan, deadline)
    d = es.differences(check.f0, len(probes.index), check.sigma, check.u, check.float64,
                       o.f_scale)
    found = es.derivative(probes.evaluate, d, checked, g_round, g_ad, ad_round,
                          schedule=check.schedule, checked_is_autodiff=g.is_autodiff)
    return cp.compared(found.model, found.cmp, found.cmp_ad, checked, g_round, g_ad, ad_round,
                       o.rtol, o.atol)


def directional_phase(check: Check) -> tuple[Check, dict]:
    """Directions per leaf (directional.py); the entries group testing leaves in doubt, and a
    sample of any leaf the directions resolve no better than COARSE, join the plan."""
    o, g = check.options, check.gradients
    run_ = dr.Directional(check.ev, check.sp, check.plan, check.f0, check.sigma, check.u,
                          check.float64, o.f_scale, o.seed, check.schedule, g.is_autodiff)
    plan, outcomes, escalated = run_.phase(g.checked, g.autodiff, o.samples, cp.leaf_rounding)
    check = dataclasses.replace(check, plan=plan)
    if escalated:
        check = check.note(
            f"directional: random directions resolve {listing(escalated, 5)}"
            f" no better than {dg.COARSE:.0%}, so jgc "
            f"also checked up to {o.samples} of {'its' if len(escalated) == 1 else 'their'} "
            "entries one by one")
    return check, outcomes


def leaf_reports(check: Check, found: cp.Compared, outcomes: dict):
    """One LeafReport per leaf of params, in tree order, and whether the checked gradient
    agrees with jax.grad where it mismatches (for the three-way triage)."""
    sp, plan, g, o = check.sp, check.plan, check.gradients, check.options
    bounds = cp.Bounds(None if o.user_tolerance else es.zero_bound(g.checked),
                       0.0 if g.autodiff is None else es.zero_bound(g.autodiff),
                       check.full_stencils and check.sigma is not None
                       and not o.user_tolerance)
    leaves, agrees, pos = [], {}, 0
    checked_at = {i: k for k, i in enumerate(sp.checked)}
    for i, spec in enumerate(sp.specs):
        if i not in checked_at:
            leaves.append(cp.skipped(spec))
            continue
        k = checked_at[i]
        sl = slice(pos, pos + len(plan.entries[k]))
        pos = sl.stop
        data = cp.leaf_data(spec, plan.entries[k], plan.leaf_values(sp, k)[plan.entries[k]],
                            found.take(sl), bounds, sl)
        report = dg.leaf_report(data, full=plan.mode == Mode.FULL)
        agrees[spec.path] = dg.agrees_with_autodiff(data)
        if k in outcomes:
            report, agree_dir = dr.merge(report, outcomes[k],
                                         judge_resolution=bounds.zero is not None)
            agrees[spec.path] = agrees[spec.path] if agree_dir is None else agree_dir
        leaves.append(report)
    return leaves, agrees


def closing_notes(check: Check, found: cp.Compared, text: str) -> tuple[Check, str]:
    """The notes that depend on the whole check."""
    g, o, plan, sp = check.gradients, check.options, check.plan, check.sp
    if g.autodiff is None and not g.is_autodiff:
        check = check.note(f"jax.grad is not available as a third opinion: {g.autodiff_why}")
    strategy = check.ev.strategy_note()
    if strategy:
        check = check.note(strategy)
    mutation = calls.mutation_note(g.call)
    if mutation:
        check = check.note(mutation)
        text += f"\nWarning: {mutation}."
    if o.method == Method.RICHARDSON and found.model.kink.any():
        check = check.note(
            f"the loss has kinks ({int(found.model.kink.sum())} entries): Richardson's wide "
            "stencil (h, 2h, 4h at h = u**(1/5)) assumes smoothness over it and can be wrong "
            "near them; for relu or max-pool losses prefer method='central'")
    if plan.mode == Mode.SAMPLE:
        check = check.note(f"sampled: {len(found.g)} of {sp.n} entries were checked (up to "
                           f"{o.samples} per leaf, seed={o.seed}); use mode='full' to check "
                           "every entry")
    if plan.mode == Mode.DIRECTIONAL:
        check = check.note(f"directional: {dr.N_DIRECTIONS} random directions per leaf (seeded "
                           f"by its path, seed={o.seed}); a full check would cost at least "
                           f"{2 * sp.n:,} evaluations")
    return check, text


def header(check: Check) -> cp.Header:
    return cp.Header(check.gradients.source, precision_name(check.plan, check.sp),
                     method_name(check.options.method, check.full_stencils), check.plan.mode,
                     check.plan.step_rule, check.sp.n)


def precision_name(plan: pl.Plan, sp: Split) -> str:
    """The evaluation dtypes, e.g. 'float64 (x64)'; a complex leaf's as complex128."""
    names = sorted({str(np.result_type(d, np.complex64) if s.is_complex else d)
                    for d, s in zip(plan.dtypes, sp.checked_specs())})
    return "/".join(names) + (" (x64)" if plan.x64 else "")


def method_name(method: Method, full: bool) -> str:
    if method == Method.COMPLEX:
        return "complex step Im f(x + ih)/h (analyticity verified on a sample)"
    if method == Method.RICHARDSON:
        return "Richardson extrapolation of central differences at h, 2h, 4h"
    if full:
        return "central differences at h and 2h (every entry: reduced precision)"
    return "central differences (second stencil at 2h where needed)"


def batch_size(args) -> int | None:
    """The leading dimension of the first array argument: the batch size m of (X, Y) losses."""
    for leaf in jax.tree_util.tree_leaves(args):
        shape = getattr(leaf, "shape", ())
        if len(shape) >= 1:
            return int(shape[0])
    return None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _where_not_finite(params, args) -> str:
    """Names the inputs holding NaN or Inf, or says that they are all finite."""
    bad = []
    for name, tree in (("params", params), ("args", args)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            a = np.asarray(leaf) if hasattr(leaf, "shape") or isinstance(leaf, float) else None
            if a is not None and np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
                n = int((~np.isfinite(a)).sum())
                bad.append(f"{name}{jax.tree_util.keystr(path)} ({n} non-finite entr"
                           f"{'y' if n == 1 else 'ies'})")
    if bad:
        return f"The inputs are not finite: {', '.join(bad[:5])}. Fix or filter them first; "
    return ("Every input is finite, so the loss itself produces it (log or division at 0, an "
            "overflow in exp): check the initialisation and the data scale; ")


def numerical_grad(loss: Callable, params, args: tuple, o: Options):
    """The finite-difference gradient, shaped like params (skipped leaves as None)."""
    calls.require_function(loss)
    refuse_unusable(params=params, args=args)
    sp = split_checked(params)
    if o.method == Method.COMPLEX:
        complexstep.refuse_complex_leaves(sp)
    plan = pl.make_plan(sp, mode=Mode.FULL, x64=o.x64, eps=o.eps, samples=0, seed=0,
                        method=o.method)
    args, _ = promote_args(args, o.x64)
    ev = make_evaluator(loss, sp, plan.theta, plan.dtypes, args, has_aux=o.has_aux)
    u = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))
    float64 = u <= pl.machine_eps(np.float64)
    f0 = ev.at()
    if o.method == Method.COMPLEX:
        value = complexstep.values(ev, sp, plan, f0, None, u, float64, 0.0, 0)
    else:
        probes = Coordinates(ev, sp, plan)
        d = es.differences(f0, len(probes.index), None, u, float64)
        value = es.values(probes.evaluate, d, o.method)
    out = [None] * len(sp.specs)
    for k, (i, leaf) in enumerate(zip(sp.checked, _to_leaves(sp, value))):
        out[i] = leaf.astype(plan.dtypes[k])
        if sp.specs[i].is_complex:  # df/dx - i df/dy: JAX's convention, as jax.grad returns
            out[i] = complex_value(out[i])
    return jax.tree_util.tree_unflatten(sp.treedef, out)
