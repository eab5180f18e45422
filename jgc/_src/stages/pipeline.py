"""A gradient check, end to end: split -> plan -> evaluate -> estimate -> compare -> diagnose.

`prepare` (prepare.py) builds the carrier, a frozen `Check` holding what every later stage
shares: the split, the plan, the evaluator (one trace of the loss), f0 and the options; here the
gradients being compared (`Gradients`, its `side`) and the measured noise join it. Each stage is
a plain function of it, returning a new Check or its own results; nothing flows back up. `run`
is the whole check as those stage calls; `numerical_grad` is the same carrier without anything
to compare.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jgc._src.evaluators import autodiff as ad
from jgc._src.evaluators import calls
from jgc._src.evaluators.deadline import Deadline, TooSlow
from jgc._src.localize import audit as localize
from jgc._src.report import explain
from jgc._src.report.report import LeafReport, Report
from jgc._src.report.vocab import Method, Mode, Status
from jgc._src.stages import compare as cp
from jgc._src.stages import complexstep, noise, userprecision
from jgc._src.stages import diagnose as dg
from jgc._src.stages import differences as dq
from jgc._src.stages import directional as dr
from jgc._src.stages import errormodel as em
from jgc._src.stages import estimate as es
from jgc._src.stages import plan as pl
from jgc._src.stages.perturbations import Coordinates
from jgc._src.stages.prepare import Check, Precision, Subject, prepare
from jgc._src.stages.split import InputError, Split, complex_value, listing, match_gradient
from jgc._src.surfaces.options import Options


@dataclasses.dataclass(frozen=True)
class Gradients:
    """The gradients a check compares, per checked leaf (`Check.side` of a gradient check)."""

    checked: tuple[np.ndarray, ...]  # in the gradient's own dtype (its rounding counts)
    autodiff: tuple[np.ndarray, ...] | None  # jax.grad as a third opinion, when it is one
    source: str  # "hand-written", "jax.grad", ...
    autodiff_why: str | None  # why jax.grad is unavailable
    is_autodiff: bool  # the checked gradient is jax.grad itself (grad=None)
    call: calls.GradientCall | None = None
    own: userprecision.Own | None = None  # the same at the user's own precision


def run(subject: Subject, grad, o: Options, prec: Precision,
        what: str = "grad(params, *args)") -> Report:
    """The whole check of a gradient. Pure: builds copies, never touches the user's arrays or
    config. `what`: how the gradient function is named in messages."""
    check = prepare(subject, o, prec, alongside=_gradient_jobs(grad, what))
    if isinstance(check, Report):  # hidden randomness: nothing can be judged
        return check
    check = with_gradients(check, grad, what)
    check = dataclasses.replace(check, side=dataclasses.replace(
        check.side, own=userprecision.evaluate(check, grad, what)))
    check = measure_noise(choose_entries(check))
    check, found, outcomes = measure(check)
    more = CoarseDirections(check)
    leaves, agrees = leaf_reports(check, found, outcomes, more)
    if more.paths:
        check = check.note(more.note())
    g = check.side
    verdict, text = explain.diagnosis(
        leaves, agrees, source=g.source, has_autodiff=g.autodiff is not None or g.is_autodiff,
        autodiff_why=g.autodiff_why, batch=batch_size(subject.args), eps=o.eps,
        float64=check.float64, method=o.method)
    check, text = closing_notes(check, found, text)
    report = cp.build_report(leaves, verdict, text, header(check), n_checked=len(found.g),
                             n_evaluations=check.ev.n_evaluations, start=check.start,
                             notes=check.notes, noise=check.sigma,
                             global_rel=cp.global_rel_error(found.g, found.model.value))
    return localize.attach(report, check)  # names the wrong rule when jax.grad is wrong


def _gradient_jobs(grad, what: str) -> tuple:
    """jax.grad, and the user's gradient function if one is given, compiled alongside f0."""
    jobs = [ad.autodiff]
    if calls.is_function(grad):
        jobs.append(lambda ev: calls.call_gradient(ev, grad, what))
    return tuple(jobs)


def with_gradients(check: Check, grad, what: str) -> Check:
    """The gradients being compared (`Check.side`), per checked leaf, from the jobs that ran
    alongside f0."""
    ev, sp, params = check.ev, check.sp, check.subject.params
    (autodiff, why, error), *rest = check.side
    call = rest[0] if rest else None
    leaves = None if autodiff is None else tuple(_to_leaves(sp, autodiff))
    if grad is None:
        if autodiff is None:
            jaxpr = ev.traced.closed.jaxpr if ev.traceable else None
            raise ad.autodiff_failure(why, error, jaxpr) from error
        return dataclasses.replace(check, side=Gradients(leaves, None, "jax.grad", why, True))
    given = (calls.without_aux(call.out, sp, params, check.subject.has_aux)
             if call is not None else grad)
    checked = match_gradient(given, sp, params, what if call is not None else "grad")
    if call is not None and call.note:
        check = check.note(call.note)
    return dataclasses.replace(
        check, side=Gradients(tuple(checked), leaves, "hand-written", why, False, call))


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
            pl.sample_entries(sp, o.samples, o.seed, check.side.checked)))
    if plan.mode == Mode.AUTO and not check.ev.traceable:
        plan = dataclasses.replace(plan, mode=Mode.FULL)
    return dataclasses.replace(check, plan=plan)


def measure_noise(check: Check) -> Check:
    """The loss's noise; the step follows it where it exceeds the dtype's rounding."""
    sigma = noise.measure(check.ev, check.sp, check.plan)
    plan = check.plan
    if sigma is not None:
        g = check.side
        plan = pl.with_noise(plan, sigma / noise.variation(
            check.f0, check.subject.f_scale, plan.theta, g.autodiff or g.checked))
    return dataclasses.replace(check, sigma=sigma, plan=plan)


def measure(check: Check) -> tuple[Check, cp.Compared, dict]:
    """The derivative at the planned probes, by mode: every entry, a sample, or directions and
    group testing (auto: a full check unless its first stencil predicts too long a one)."""
    sp, o, g = check.sp, check.options, check.side
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
    sp, plan, g, o = check.sp, check.plan, check.side, check.options
    checked = cp.restricted(plan, list(g.checked))
    g_round = cp.restricted_rounding(plan, list(g.checked))
    g_ad = None if g.autodiff is None else cp.restricted(plan, list(g.autodiff))
    ad_round = 0.0 if g_ad is None else cp.restricted_rounding(plan, list(g.autodiff))
    if o.method == Method.COMPLEX:
        model = complexstep.model(check.ev, sp, plan, check.f0, check.sigma, check.u,
                                  check.float64, check.subject.f_scale, o.seed)
        cmp = em.compare(checked, model, o.rtol, o.atol, g_round)
        cmp_ad = None if g_ad is None else em.compare(g_ad, model, o.rtol, o.atol, ad_round)
        return cp.compared(model, cmp, cmp_ad, checked, g_round, g_ad, ad_round, o.rtol,
                           o.atol)
    probes = Coordinates(check.ev, sp, plan, deadline)
    d = dq.differences(check.f0, len(probes.index), check.sigma, check.u, check.float64,
                       check.subject.f_scale)
    groups = np.repeat(np.arange(len(plan.entries)), [len(e) for e in plan.entries])
    found = es.derivative(probes.evaluate, d, checked, g_round, g_ad, ad_round,
                          schedule=check.schedule, checked_is_autodiff=g.is_autodiff,
                          groups=groups)
    return cp.compared(found.model, found.cmp, found.cmp_ad, checked, g_round, g_ad, ad_round,
                       o.rtol, o.atol)


def directional_phase(check: Check) -> tuple[Check, dict]:
    """Directions per leaf (directional.py); the entries group testing leaves in doubt, and a
    sample of any leaf the directions resolve no better than COARSE, join the plan."""
    o, g = check.options, check.side
    run_ = dr.Directional(check.ev, check.sp, check.plan, check.f0, check.sigma, check.u,
                          check.float64, check.subject.f_scale, o.seed, check.schedule,
                          g.is_autodiff)
    plan, outcomes, escalated = run_.phase(g.checked, g.autodiff, o.samples, cp.leaf_rounding)
    check = dataclasses.replace(check, plan=plan)
    if escalated:
        check = check.note(
            f"directional: random directions resolve {listing(escalated, 5)}"
            f" no better than {dg.COARSE:.0%}, so jgc "
            f"also checked up to {o.samples} of {'its' if len(escalated) == 1 else 'their'} "
            "entries one by one")
    return check, outcomes


def leaf_reports(check: Check, found: cp.Compared, outcomes: dict, more=None):
    """One LeafReport per leaf of params, in tree order, and whether the checked gradient
    agrees with jax.grad where it mismatches (for the three-way triage). `more`: directional
    tests for the leaves the entries leave coarse (`CoarseDirections`), or None."""
    sp, plan, g, o = check.sp, check.plan, check.side, check.options
    bounds = cp.Bounds(None if o.user_tolerance else em.zero_bound(g.checked),
                       0.0 if g.autodiff is None else em.zero_bound(g.autodiff),
                       check.full_stencils and check.sigma is not None
                       and not o.user_tolerance,
                       cp.pattern_floor(check.u, o.method),
                       dq.KAPPA * check.u * max(abs(check.f0), check.subject.f_scale))
    reports, agrees, pos = {}, {}, 0
    checked_at = {i: k for k, i in enumerate(sp.checked)}
    for i, spec in enumerate(sp.specs):
        if i not in checked_at:
            continue
        k = checked_at[i]
        sl = slice(pos, pos + len(plan.entries[k]))
        pos = sl.stop
        if spec.size and not sp.finite(k).any():  # no entry a step can move: nothing verified
            reports[k] = LeafReport(spec.path, spec.shape, spec.dtype, 0, Status.UNRESOLVED,
                                    reason="no finite entry")
            continue
        data = cp.leaf_data(spec, plan.entries[k], plan.leaf_values(sp, k)[plan.entries[k]],
                            found.take(sl), bounds, sl)
        reports[k] = dg.leaf_report(data, full=plan.mode == Mode.FULL)
        agrees[spec.path] = dg.agrees_with_autodiff(data)
    if more is not None:
        outcomes = {**outcomes, **more.outcomes(reports)}
    own = userprecision.findings(
        g.own, g.checked, g.autodiff, userprecision.own_dtypes(check) if g.own else (),
        [plan.leaf_values(sp, k).reshape(sp.specs[i].view_shape)
         for k, i in enumerate(sp.checked)],
        max(abs(check.f0), check.subject.f_scale))
    leaves = []
    for i, spec in enumerate(sp.specs):
        if i not in checked_at:
            leaves.append(cp.skipped(spec))
            continue
        k = checked_at[i]
        report = reports[k]
        if k in outcomes and not report.reason:
            report, agree_dir = dr.merge(report, outcomes[k],
                                         judge_resolution=bounds.zero is not None)
            agrees[spec.path] = agrees[spec.path] if agree_dir is None else agree_dir
        leaves.append(userprecision.merge(report, own.get(k)))
    return leaves, agrees


class CoarseDirections:
    """A full check's directional tests (directional.py) of the leaves whose entries, one by
    one, resolve no better than COARSE (`outcomes`).

    A leaf of many small entries, each near the loss's rounding, has wide error bars entry by
    entry, and its leaf-level test (patterns.Collective) needs the summed excess of n entries
    to beat n + 6 sqrt(2n) noises. A random direction sums the signal of all of them under one
    stencil's noise: on an Equinox GRU's recurrent weight in float32 (19,200 entries) the
    entries resolve a leaf-wide factor of 2.75%, two directions 0.77%. A few evaluations per
    leaf (two directions at h and 2h, refined where they disagree), in one batch for all the
    leaves (directional.Directional.run_leaves); no group testing: every entry was checked.

    That batch runs through its own program, whose rounding may differ from the coordinate
    programs' (a structured pass): the loss's noise is measured there too, and the larger of
    the two levels is used.
    """

    def __init__(self, check: Check):
        o = check.options
        self.check, self.paths = check, []
        self.enabled = (check.plan.mode == Mode.FULL and check.ev.traceable
                        and o.method != Method.COMPLEX and not o.user_tolerance)

    @staticmethod
    def wanted(report: LeafReport) -> bool:
        return (report.status in (Status.OK, Status.KINK) and not report.reason
                and report.resolution is not None and report.resolution > dg.COARSE
                and int(np.prod(report.shape)) > 1)

    def outcomes(self, reports: dict) -> dict:
        ks = sorted(k for k, r in reports.items() if self.wanted(r))
        if not (self.enabled and ks):
            return {}
        c, g = self.check, self.check.side
        one_dtype = len(set(c.plan.dtypes)) == 1
        levels = [c.sigma, noise.measure(c.ev, c.sp, dataclasses.replace(
            c.plan, mode=Mode.DIRECTIONAL), whole=one_dtype)]
        run_ = dr.Directional(c.ev, c.sp, c.plan, c.f0,
                              max((x for x in levels if x is not None), default=None), c.u,
                              c.float64, c.subject.f_scale, c.options.seed, c.schedule,
                              g.is_autodiff)
        self.paths = [reports[k].path or "<params>" for k in ks]
        if not one_dtype:  # one program per leaf, each in its own dtype
            return {k: run_.run_leaf(k, np.asarray(g.checked[k], np.float64).ravel(),
                                     cp.leaf_rounding(g.checked[k]), None
                                     if g.autodiff is None else
                                     np.asarray(g.autodiff[k], np.float64).ravel(),
                                     localize=False) for k in ks}

        def flat(leaves, each):
            return np.concatenate([np.asarray(each(x), np.float64).ravel() for x in leaves])
        return run_.run_leaves(ks, flat(g.checked, lambda x: x),
                               flat(g.checked, cp.leaf_rounding),
                               None if g.autodiff is None else flat(g.autodiff, lambda x: x))

    def note(self) -> str:
        return (f"full: {listing(self.paths, 5)} also tested along {dr.N_DIRECTIONS} random "
                f"directions (seeded by the path, seed={self.check.options.seed}): entry by "
                f"entry {'it resolves' if len(self.paths) == 1 else 'they resolve'} no better "
                f"than {dg.COARSE:.0%}, and a direction sums the signal of every entry")


def closing_notes(check: Check, found: cp.Compared, text: str) -> tuple[Check, str]:
    """The notes that depend on the whole check."""
    g, o, plan, sp = check.side, check.options, check.plan, check.sp
    if g.own is not None and g.own.checked is None:
        check = check.note(f"not compared at your own precision ({g.own.dtype}): {g.source} "
                           f"could not be evaluated there ({g.own.why}); the check itself ran "
                           "in float64")
    if g.own is not None and g.own.checked is not None and g.own.draws:
        check = check.note(
            f"at your own precision ({g.own.dtype}) only non-finite gradient entries were looked "
            "for: the loss draws random numbers (jax.random), which become different numbers "
            "in each precision, so the two compute different functions whose gradients cannot "
            "be compared")
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
    return check.header(check.side.source, method_name(check.options.method, check.full_stencils),
                        check.plan.mode)


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


def numerical_grad(subject: Subject, o: Options, prec: Precision):
    """The finite-difference gradient, shaped like params (skipped leaves as None)."""
    check = prepare(subject, dataclasses.replace(o, mode=Mode.FULL), prec)
    if isinstance(check, Report):
        raise InputError(f"{check.diagnosis} numerical_grad cannot differentiate it.")
    sp, plan, ev = check.sp, check.plan, check.ev
    if o.method == Method.COMPLEX:
        value = complexstep.values(ev, sp, plan, check.f0, None, check.u, check.float64, 0.0, 0)
    else:
        probes = Coordinates(ev, sp, plan)
        d = dq.differences(check.f0, len(probes.index), None, check.u, check.float64)
        value = es.values(probes.evaluate, d, o.method)
    out = [None] * len(sp.specs)
    for k, (i, leaf) in enumerate(zip(sp.checked, _to_leaves(sp, value))):
        out[i] = leaf.astype(plan.dtypes[k])
        if sp.specs[i].is_complex:  # df/dx - i df/dy: JAX's convention, as jax.grad returns
            out[i] = complex_value(out[i])
    return jax.tree_util.tree_unflatten(sp.treedef, out)
