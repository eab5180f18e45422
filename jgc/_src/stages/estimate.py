"""Stage `estimate`: the derivative along a set of perturbations, through one stencil schedule.

`derivative` owns the schedule for every surface (check_grad, check_vjp, check_jvp, check_hvp,
directional mode): which stencils an entry gets (`Schedule`), how many levels finer a suspect
is refined to, and when the coarser pair is tried. A perturbation kind (perturbations.py)
only says how stencil s is evaluated, returning `Sides`. The quotients are differences.py's,
the error model and the comparison errormodel.py's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jgc._src.report.vocab import Method
from jgc._src.stages.differences import (
    COARSER,
    LEVELS,
    MAX_LEVELS,
    MISMATCH,
    OK,
    ROUGH,
    ROUGH_PROBES,
    TOL_FACTOR,
    Differences,
    with_stencil,
)
from jgc._src.stages.errormodel import (
    Comparison,
    ErrorModel,
    _level,
    compare,
    crossing,
    error_model,
    second_opinion,
    suspects,
    tolerance,
)

# -- the stencil schedule -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which stencils a derivative gets.

    Attributes:
      method: "central" (h, then 2h where needed) or "richardson" (h, 2h and 4h everywhere).
      everywhere: the 2h stencil at every probe, not only at suspects (reduced precision: the
        leaf-level test needs it).
      refine: finer steps where a gradient is still not clean (not when the user fixed the
        step or the tolerance: their choice stands).
      rtol, atol: the user's tolerance, overriding the error model.
    """

    method: str = Method.CENTRAL
    everywhere: bool = False
    refine: bool = True
    rtol: float | None = None
    atol: float | None = None


@dataclasses.dataclass(frozen=True)
class Sides:
    """One stencil at some probes: the values on both sides and the exact steps taken; per
    probe, the unperturbed value when the probes are a vector function's outputs (else the
    loss's d.f0), and the `with_stencil` shift when the checked value depends on the step."""

    fp: np.ndarray
    fm: np.ndarray
    hp: np.ndarray
    hm: np.ndarray
    f0: np.ndarray | None = None
    shift: tuple | None = None


def values(evaluate, d: Differences, method: str = Method.CENTRAL) -> np.ndarray:
    """The numerical derivative alone, with nothing to compare (numerical_grad): stencil h
    everywhere, and 2h and 4h for Richardson."""
    everywhere = np.ones(len(d.stencils[0].central), bool)
    for s in range(3 if method == Method.RICHARDSON else 1):
        v = evaluate(s, everywhere)
        d = with_stencil(d, s, everywhere, v.fp, v.fm, v.hp, v.hm)
    return error_model(d, method).value


@dataclasses.dataclass(frozen=True)
class Derivative:
    """The numerical derivative at a set of probes, and the gradients compared with it."""

    d: Differences
    model: ErrorModel
    cmp: Comparison  # the checked gradient
    cmp_ad: Comparison | None  # jax's own, when it is a separate opinion

    def unclear(self) -> np.ndarray:
        """Probes where a gradient is not plainly OK (a mismatch, a kink or a tie)."""
        out = self.cmp.status != OK
        if self.cmp_ad is not None:
            out |= self.cmp_ad.status != OK
        return out


def derivative(evaluate, d: Differences, checked: np.ndarray, checked_error,
               autodiff: np.ndarray | None = None, autodiff_error=0.0, *,
               schedule: Schedule = Schedule(), checked_is_autodiff: bool = False,
               groups: np.ndarray | None = None) -> Derivative:
    """The numerical derivative at every probe, by one stencil schedule for every kind of
    probe (an entry of a leaf, a direction, an output element along a tangent).

    `evaluate(s, where)` returns the `Sides` of stencil s (step multiplier SCALES[s]) at the
    probes selected by the bool mask `where` (see probes.py).

    Schedule: stencil h everywhere; 2h where a gradient disagrees beyond rounding (everywhere
    with `schedule.everywhere` or Richardson); 4h for Richardson; then the refinement levels
    (h/4 and h/8, h/32 and h/64, ...) where a gradient is still not clean (see error_model).

    `groups`: per probe, the group it belongs to (a leaf's entries share one), for telling where
    the steps cross kinks (errormodel.crossing); None: the probes are one group. The one-sided
    slopes' range is kept only there, and not under the user's tolerance (their choice stands).
    """
    m = len(checked)
    everywhere = np.ones(m, bool)

    def fill(d, s, where):
        if not where.any():
            return d
        v = evaluate(s, where)
        return with_stencil(d, s, where, v.fp, v.fm, v.hp, v.hm, f0=v.f0, shift=v.shift)

    def judge(d):
        model = error_model(d, schedule.method)
        keep = (schedule.rtol is None and schedule.atol is None) & crossing(model, groups)
        model = dataclasses.replace(
            model, spread_low=np.where(keep, model.spread_low, np.nan),
            spread_high=np.where(keep, model.spread_high, np.nan), crossed=keep)
        cmp_ad = None
        if autodiff is not None:
            cmp_ad = compare(autodiff, model, schedule.rtol, schedule.atol, autodiff_error,
                             tie=True)
        tie = checked_is_autodiff or (autodiff is not None and _tie_convention(
            checked, autodiff, model, tolerance(model.error + checked_error, model.value,
                                                schedule.rtol, schedule.atol)))
        supported = True
        if autodiff is not None and not checked_is_autodiff:
            supported = second_opinion(checked, autodiff, model, checked_error, autodiff_error,
                                       schedule.rtol, schedule.atol)
        cmp = compare(checked, model, schedule.rtol, schedule.atol, checked_error, tie=tie,
                      supported=supported)
        return Derivative(d, model, cmp, cmp_ad)

    d = fill(d, 0, everywhere)
    if schedule.everywhere or schedule.method == Method.RICHARDSON:
        second = everywhere
    else:
        second = suspects(d, checked, schedule.rtol, schedule.atol, checked_error)
        if autodiff is not None:
            second |= suspects(d, autodiff, schedule.rtol, schedule.atol, autodiff_error)
    d = fill(d, 1, second)
    if schedule.method == Method.RICHARDSON:
        d = fill(d, 2, everywhere)
    out = judge(d)
    if not schedule.refine:
        return out
    # Refine, level by level, every probe that is not clean: a mismatch, or a kink (the
    # stencils may merely have crossed one that a finer step clears, and a value between wide
    # slopes is no verification). A probe that becomes clean stops.
    doubt = out.unclear()
    for a, b in LEVELS[:MAX_LEVELS[d.float64]]:
        if not doubt.any():
            break
        d = fill(fill(d, a, doubt), b, doubt)
        out = judge(d)
        doubt &= out.unclear()
    try_coarser = _worst_mismatches(out, checked, ROUGH_PROBES)
    if not try_coarser.any():
        return out
    d = fill(fill(d, COARSER[0], try_coarser), COARSER[1], try_coarser)

    def roughen(cmp: Comparison, values, error) -> Comparison:
        rough = scale_dependent(d, out.model, values, error, try_coarser)
        return dataclasses.replace(cmp, status=np.where(rough & (cmp.status == MISMATCH),
                                                        ROUGH, cmp.status))

    return dataclasses.replace(
        out, cmp=roughen(out.cmp, checked, checked_error),
        cmp_ad=None if out.cmp_ad is None else roughen(out.cmp_ad, autodiff, autodiff_error))


def _worst_mismatches(out: Derivative, checked: np.ndarray, limit: int) -> np.ndarray:
    """Up to `limit` of the checked value's smooth mismatches, the worst (in error bars) first."""
    bad = (out.cmp.status == MISMATCH) & ~out.model.kink & np.isfinite(checked)
    if bad.sum() <= limit:
        return bad
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.where(bad, np.abs(checked - out.model.value) / out.model.error, -np.inf)
    keep = np.zeros(len(bad), bool)
    keep[np.argsort(-excess, kind="stable")[:limit]] = True
    return keep


def scale_dependent(d: Differences, model: ErrorModel, checked, checked_error,
                    where: np.ndarray) -> np.ndarray:
    """Mismatches that are the loss's, not the checked value's: the derivative at the coarser
    pair (64h, 128h) is smooth, disagrees with the estimate at h beyond both error bars, and
    agrees with the checked value.

    A derivative does not depend on the step: for a smooth loss the coarser pair agrees with h
    to within its truncation, |D(128h) - D(64h)| / 3. A loss computed to only ~7 digits (a
    special function's approximation error, wiggling faster than 64h) has a derivative at h
    that is that error's slope, and an exact rule agrees only with the coarser pair, where the
    wiggle averages out: finite differences then say the loss is not smooth at the step's
    scale, which is what such a probe reports (Entry.ROUGH), rather than blaming the rule. A
    wrong rule disagrees at every scale.
    """
    a, b = d.stencils[COARSER[0]], d.stencils[COARSER[1]]
    coarse = _level(a, b, coarse_first=True)
    with np.errstate(invalid="ignore"):
        tol = TOL_FACTOR * (coarse["error"] + np.asarray(checked_error) + 0.0)
        apart = np.abs(coarse["value"] - model.value) > TOL_FACTOR * (coarse["error"]
                                                                       + model.error)
        agrees = np.abs(checked - coarse["value"]) <= tol
        return where & coarse["smooth"] & apart & agrees


def _tie_convention(checked, autodiff, model: ErrorModel, tol) -> np.ndarray:
    """Where the checked value is one a tie convention could give, knowing jax.grad's.

    At a tie the one-sided slopes are L = b + A and R = b + B, where b leaves every tied
    element off and A, B sum the elements that turn on to the left and to the right; jax.grad
    gives b (relu'(0) = 0), a mask z >= 0 gives b + A + B = L + R - b. Conventions lie between
    those: the checked value is accepted inside the hull of L, R, jax.grad and L + R - jax.grad
    (L and R extrapolated to zero step at the finest stencils), and nowhere else.
    """
    if model.left is None:
        return np.zeros(len(checked), bool)
    mirror = model.left + model.right - autodiff
    with np.errstate(invalid="ignore"):
        slack = tol + model.side_error
        lo = np.fmin(np.fmin(model.low, autodiff), mirror) - slack
        hi = np.fmax(np.fmax(model.high, autodiff), mirror) + slack
        return (checked >= lo) & (checked <= hi)
