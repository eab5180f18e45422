"""Stage `diagnose`: each leaf's status, pattern and resolution, and who is wrong.

Three-way triage, per mismatched leaf (checked = the hand-written gradient):
  * checked vs numerical disagree, jax.grad agrees with numerical: the hand-written gradient
    is wrong.
  * checked and jax.grad agree with each other, not with numerical: the numerics are suspect
    (a kink, precision, the step) or the loss is not differentiable at params.
  * all three disagree: no source can be trusted on that leaf.
With grad=None, jax.grad itself is checked (this is how custom_vjp/custom_jvp rules are tested).
The bug patterns are in patterns.py; the words that explain the verdict in explain.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jgc._src.report.report import LeafReport
from jgc._src.report.vocab import Pattern, Status, Verdict
from jgc._src.stages.differences import KINK, MISMATCH, ROUGH, TIE, TOL_FACTOR
from jgc._src.stages.errormodel import Comparison, apart
from jgc._src.stages.patterns import Collective, find_pattern
from jgc._src.stages.split import LeafSpec

COARSE = 0.01  # A leaf whose resolution is coarser than 1% gets a note: such bugs can hide.
# A leaf is "unresolved" when the check could not tell its gradient from one 2x too large, its
# negative or zero: each differs from the right one by 100% (or more) of its size.
UNRESOLVED = 1.0
N_WORST = 5


@dataclasses.dataclass(frozen=True)
class LeafData:
    """The numbers for one checked leaf, restricted to its planned entries."""

    spec: LeafSpec
    entries: np.ndarray  # Flat indices within the leaf.
    theta: np.ndarray  # Parameter values at those entries.
    numerical: np.ndarray
    tol: np.ndarray  # Allowed |g - D| per entry.
    checked: np.ndarray
    cmp: Comparison
    autodiff: np.ndarray | None
    autodiff_cmp: Comparison | None
    agree: np.ndarray | None  # bool per entry: checked agrees with jax.grad.
    kink: np.ndarray | None = None  # bool per entry: the loss is not smooth there.
    collective: Collective | None = None  # Leaf-level tests (reduced precision only).
    autodiff_collective: Collective | None = None
    # |value| below which a gradient entry is zero to rounding, on the scale of the whole
    # gradient (all leaves): for the checked gradient and for jax.grad. None: not judged (the
    # user fixed the tolerance with rtol/atol, so resolution is theirs to choose).
    zero_bound: float | None = 0.0
    autodiff_zero_bound: float = 0.0
    # The loss's own rounding (compare.Bounds.loss_rounding): where the gradient changes the
    # loss by less than it, the gradient is zero at the loss's precision.
    loss_rounding: float = 0.0
    # Per entry, the range of the one-sided slopes at h (estimate.ErrorModel.slope_low/high).
    slopes: tuple[np.ndarray, np.ndarray] | None = None
    # Per entry, the rounding part of the coarse error bar (estimate.ErrorModel.rounding).
    rounding: np.ndarray | None = None
    # Per entry: the rounding bounds of the checked gradient and jax.grad added, for comparing
    # the two with each other at their own precision (no finite differences involved).
    pair_rounding: np.ndarray | float = 0.0
    # How many entries the steps were seen to cross kinks at (compare.kinks_found).
    kinks_found: int = 0
    # Per entry: how far from the numerical derivative a value may lie and still pass (the
    # tolerance, a finer stencil's support, or at a kink half the one-sided slopes' range),
    # for the resolution; None: the tolerance.
    accept_width: np.ndarray | None = None



def leaf_report(x: LeafData, full: bool) -> LeafReport:
    """One leaf's result: its status, pattern, resolution and worst entries."""
    n = len(x.entries)
    if n == 0:
        return LeafReport(x.spec.path, x.spec.shape, x.spec.dtype, 0, Status.OK)
    unseen = _unseen_kinks(x)
    if unseen.any():
        x = dataclasses.replace(x, cmp=dataclasses.replace(
            x.cmp, status=np.where(unseen, ROUGH, x.cmp.status)))
    spec, cmp = x.spec, x.cmp
    n_mis = int(np.sum(cmp.status == MISMATCH))
    n_rough = int(np.sum(cmp.status == ROUGH))
    n_tie = int(np.sum(cmp.status == TIE))
    n_kink = int(np.sum(cmp.status == KINK)) + n_tie
    nonfinite = ~np.isfinite(x.checked)
    fit = _whole_leaf_fit(x) if n_mis == 0 else (None, None)
    as_whole = fit[0] is not None or (n_mis == 0 and _excess_beyond_autodiff(x))
    unexplained = n_mis == 0 and not as_whole and x.collective is not None \
        and x.collective.significant and not x.collective.below_floor(x.checked, x.theta)
    resolution = math.inf if n_rough else _resolution(x)
    zero = x.zero_bound is not None and not n_rough and _verified_zero(x)
    if n_mis or as_whole:
        status = Status.MISMATCH
    elif n_rough or (x.zero_bound is not None and resolution >= UNRESOLVED and not zero):
        status = Status.UNRESOLVED  # a rough entry: the loss is not smooth at the step's scale
    else:
        status = Status.KINK if n_kink else Status.OK
    if nonfinite.any():
        pattern, factor = Pattern.NONFINITE, None
    elif n_mis:
        pattern, factor = _entry_pattern(x, full)
    else:
        pattern, factor = fit
    rows = _worst_rows(x, n_mis, fit[0] is not None)
    top = rows[0] if rows else (None, None, None, None)
    rel = np.full(spec.size, np.nan)  # per entry, NaN where not checked (for plots)
    rel[x.entries] = cmp.rel_error
    rel = rel.reshape(spec.view_shape)
    if spec.is_complex:  # per complex entry: the worse of its two parts
        rel = np.fmax(rel[..., 0], rel[..., 1])
    return LeafReport(
        spec.path, spec.shape, spec.dtype, n, status,
        resolution=None if zero and resolution >= UNRESOLVED else resolution, zero=zero,
        limited_by=(None if status != Status.UNRESOLVED else "kinks" if unseen.any()
                    else "truncation" if n_rough else _limited_by(x)),
        rel_errors=rel,
        max_rel_error=float(np.nanmax(np.nan_to_num(cmp.rel_error, nan=np.inf))),
        worst_index=top[0], numerical=top[1], checked=top[2], autodiff=top[3],
        n_mismatch=n_mis, n_rough=n_rough, n_kink=n_kink, pattern=pattern, factor=factor,
        autodiff_status=_autodiff_status(x), worst=rows, n_nonfinite=int(nonfinite.sum()),
        n_tie=n_tie, unexplained_excess=unexplained, autodiff_disagrees=_autodiff_disagrees(x))


# Mismatches that kinks crossed unseen may make, per entry seen crossing a kink (see
# `_unseen_kinks`).
UNSEEN_PER_SEEN = 0.2


def _unseen_kinks(x: LeafData) -> np.ndarray:
    """Per entry, a mismatch that kinks crossed unseen may explain, with no second opinion
    to say otherwise: the leaf has no more mismatches than UNSEEN_PER_SEEN times the entries its
    steps were seen to cross kinks at (compare.kinks_found: at a kink, or refined off biased
    coarse stencils), and jax.grad is not a separate opinion (it is the gradient checked, or
    unavailable; where it is, the triage decides).

    The kink test misses some of the kinks its steps cross. A kink of slope jump j at distance
    t < 2h from x makes the jump statistic j (3t - 2h) / 2h (t < h) or j (2h - t) / 2h, zero
    at t = 2h/3, where it biases D(h) by j/6. Beyond D(h)'s tolerance (TOL_FACTOR error bars,
    three noises or more) that takes j above 18 noises, and the statistic's threshold is 4.2
    noises (NOISE_SIGMAS of its standard deviation, 0.70 noises): the band around 2h/3 where it
    stays below is 2/3 of the threshold over j of the reach, under 16%, while the kink is seen
    over more than 80% of it. So about one biased mismatch per five entries seen at kinks. A
    float32 relu LSTM (weights N(0, 0.3^2), twelve draws) had at most 16 mismatches against
    1262 kinks seen (1.3%), each 12 to 100% off a jax.grad that float64 confirms; a custom_jvp
    relu whose slope is 2 made 451 against 873. Such entries are not verified (ROUGH: the leaf
    is unresolved, and the check not ok); x64=True decides."""
    none = np.zeros(len(x.cmp.status), bool)
    if x.autodiff is not None or x.kink is None:
        return none
    mis = (x.cmp.status == MISMATCH) & np.isfinite(x.checked)
    if not mis.any() or mis.sum() > UNSEEN_PER_SEEN * x.kinks_found \
            or (x.cmp.status == MISMATCH).sum() > mis.sum():
        return none
    return mis


def _whole_leaf_fit(x: LeafData) -> tuple[Pattern | None, float | None]:
    """The pattern of a leaf whose entries each pass but whose leaf-level test fails.

    A leaf-level excess is a bug only when a systematic pattern explains it (a factor, a term
    proportional to the parameters): many small real errors are systematic, while kinks crossed
    by the steps (a conv bias feeding hundreds of relu units, at a float32 step) leave residuals
    of random sign, 30 standard deviations on a correct Flax CNN.
    """
    if x.collective is None or not x.collective.significant:
        return None, None
    return x.collective.fit(x.checked, x.theta)


def _excess_beyond_autodiff(x: LeafData) -> bool:
    """The leaf-level test fails for the checked gradient but passes for jax.grad on the same
    entries, and the two differ beyond their own rounding: a wrong leaf, pattern or not.

    An excess without a pattern is put down to kinks the steps crossed unseen (they bias the
    finite differences at random), but such a bias would raise jax.grad's residuals just as
    much: where jax.grad passes the same test, the finite differences are not biased there, so
    the checked gradient's excess is its own (on a complex modReLU layer in complex64, a
    dropped phase term, 2 to 8% per entry, that a finer stencil's wider error bar excused).
    """
    c, ca = x.collective, x.autodiff_collective
    return (c is not None and c.significant and ca is not None and not ca.significant
            and _autodiff_disagrees(x, beyond_ties=True, where=c.where))


def _entry_pattern(x: LeafData, full: bool) -> tuple[Pattern | None, float | None]:
    """The pattern of the mismatched entries, fitted on smooth entries only: at a kink the
    central difference is no derivative. Where every entry is at a kink, jax.grad (when it
    passed there) stands in for the numerical derivative."""
    smooth = None if x.kink is None else ~x.kink
    reference = x.numerical
    if smooth is not None and not smooth.any() and x.autodiff is not None \
            and x.autodiff_cmp is not None and not np.any(x.autodiff_cmp.status == MISMATCH):
        reference, smooth = x.autodiff, None
    imag = (x.entries % 2 == 1) if x.spec.is_complex else None
    return find_pattern(x.checked, reference, x.theta, x.tol, x.spec.view_shape, full, smooth,
                        imag)


def _autodiff_status(x: LeafData) -> Status | None:
    """How jax.grad compares with the numerical derivative on the leaf (None: not compared)."""
    if x.autodiff_cmp is None:
        return None
    c = x.autodiff_collective
    whole = c is not None and c.significant and c.fit(x.autodiff, x.theta)[0] is not None
    if np.any(x.autodiff_cmp.status == MISMATCH) or whole:
        return Status.MISMATCH
    return Status.KINK if np.any(np.isin(x.autodiff_cmp.status, (KINK, TIE))) else Status.OK


def _worst_rows(x: LeafData, n_mis: int, as_whole: bool) -> tuple:
    """Up to N_WORST (index, numerical, checked, autodiff) rows, worst first.

    Under a mismatch only mismatched entries are shown (non-finite ones first); a leaf that is
    wrong only taken together ("as a whole") by a pattern shows none, since each of its entries
    agrees within its error bar and the pattern says it all (without a pattern, the largest
    relative errors are shown: where to look).
    """
    cmp = x.cmp
    if as_whole:
        return ()
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.where(cmp.status == MISMATCH, cmp.abs_error / np.maximum(x.tol, 1e-300), 0.0)
    order = np.lexsort((-np.nan_to_num(cmp.rel_error, nan=np.inf),
                        -np.nan_to_num(excess, nan=np.inf), np.isfinite(x.checked)))
    if n_mis:
        order = [j for j in order if cmp.status[j] == MISMATCH]
    if x.spec.is_complex:
        return _complex_rows(x, order)
    return tuple((tuple(int(i) for i in np.unravel_index(x.entries[j], x.spec.shape)),
                  float(x.numerical[j]), float(x.checked[j]),
                  None if x.autodiff is None else float(x.autodiff[j]))
                 for j in order[:N_WORST])


def _complex_rows(x: LeafData, order) -> tuple:
    """The worst rows of a complex leaf: one per complex entry (its worse part decides its
    place), each value the complex derivative df/dx - i df/dy in JAX's convention, as the
    gradient itself is written (a plain value's Re + i Im for check_jvp's outputs); a part
    that was not checked is NaN."""
    entries, sign = np.asarray(x.entries), 1.0 if x.spec.plain else -1.0

    def parts(j):
        """Positions of the real and imaginary part of j's entry: neighbours in the planned
        entries (check_jvp repeats the entries per direction; the partner is in j's)."""
        e, step = int(entries[j]), 1 if entries[j] % 2 == 0 else -1
        k = j + step
        partner = k if 0 <= k < len(entries) and int(entries[k]) == e + step else None
        return (j, partner) if step == 1 else (partner, j)

    def value(values, j):
        re, im = (np.nan if q is None else float(values[q]) for q in parts(j))
        return complex(re, sign * im)

    rows, seen = [], set()
    for j in order:
        e = int(entries[j]) // 2
        if e in seen:
            continue
        seen.add(e)
        rows.append((tuple(int(i) for i in np.unravel_index(e, x.spec.shape)),
                     value(x.numerical, j), value(x.checked, j),
                     None if x.autodiff is None else value(x.autodiff, j)))
        if len(rows) == N_WORST:
            break
    return tuple(rows)


def _resolution(x: LeafData) -> float:
    """The smallest relative error of the whole leaf the check would detect: the better of the
    leaf-level test in reduced precision (where it has entries; against the scatter its
    residuals show beyond noise, `Collective.resolution`) and the best-resolved single entry (its
    error bar, or at a kink the half-width of the one-sided slopes' range, or a finer stencil's
    wider error bar that can pass it, relative to the numerical derivative)."""
    finite = np.isfinite(x.checked)
    if not finite.any():
        return 0.0  # every entry is non-finite: a mismatch whatever the resolution
    width = x.tol if x.accept_width is None else x.accept_width
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = width[finite] / np.abs(x.numerical[finite])
    single = float(np.nanmin(ratio)) if np.isfinite(ratio).any() else math.inf
    if x.collective is not None and len(x.collective.where):
        return min(single, x.collective.resolution(x.checked, x.theta))
    return single


# An error bar this many times its rounding part is truncation's: the loss changes faster than
# the step can follow.
TRUNCATION_DOMINATES = 4.0


def _limited_by(x: LeafData) -> str:
    """What keeps an unresolved leaf's best entry from resolving its derivative: "rounding"
    (the loss's rounding noise is as large as the change the step makes) or "truncation" (the
    difference quotients disagree across steps: the loss varies on a scale finer than the step,
    an oscillation or a forward accurate to only a few digits)."""
    if x.rounding is None or not len(x.tol):
        return "rounding"
    with np.errstate(divide="ignore", invalid="ignore"):
        best = int(np.nanargmin(np.where(np.isfinite(x.numerical), x.tol
                                         / np.abs(x.numerical), np.inf)))
    bar = x.tol[best] / TOL_FACTOR
    return "truncation" if bar > TRUNCATION_DOMINATES * x.rounding[best] else "rounding"


def _verified_zero(x: LeafData) -> bool:
    """A gradient that is zero, verified in absolute terms.

    A zero gradient has no relative error to resolve (2x zero is zero), so it is verified when
    finite differences are consistent with zero at every entry and the gradients are zero to
    rounding: on the scale of the whole gradient (a parameter the loss does not depend on, or a
    bias in front of a normalisation, whose gradient is zero up to the rounding of terms that
    cancel), or at the loss's own precision, where the change it makes to the loss over a
    relative change of its parameter stays below the loss's rounding (a stationary point: sin
    at pi/2, where jax.grad is cos(fl(pi/2)) = 6e-17; erf at 10, 4e-45). A small but
    deliberate gradient the loss does show (1 + 1e-14 sum(w): 1e-14 against the loss's
    rounding of 4e-15) is not zero: below resolution it is unresolved.
    """
    def zero(values, bound):
        limit = np.maximum(bound, x.loss_rounding / np.maximum(1.0, np.abs(x.theta)))
        return bool(np.all(np.abs(values) <= limit))

    with np.errstate(invalid="ignore"):
        return (bool(np.all(np.abs(x.numerical) <= x.tol))
                and zero(x.checked, x.zero_bound)
                and (x.autodiff is None or zero(x.autodiff, x.autodiff_zero_bound)))


def _autodiff_disagrees(x: LeafData, beyond_ties: bool = False, where=None) -> bool:
    """jax.grad and the checked gradient differ somewhere in the leaf (or at the entries
    `where`) beyond their own rounding (both are computed, not measured, so finite
    differences' error bars do not enter).

    `beyond_ties`: only where they cannot be two conventions at a tie: an entry where both lie
    within the one-sided slopes at h is left out (at a float32 relu tie the kink test could not
    see, jax.grad's relu'(0) = 0 and a mask z >= 0 differ by the jump, and each is a one-sided
    derivative)."""
    if x.autodiff is None:
        return False
    differ = apart(x.checked, x.autodiff, x.pair_rounding)
    with np.errstate(invalid="ignore"):
        if beyond_ties and x.slopes is not None:
            low, high = x.slopes
            within = lambda v: (v >= low) & (v <= high)  # noqa: E731
            differ &= ~(within(x.checked) & within(x.autodiff))
        if where is not None:
            differ = differ[where]
        return bool(np.any(differ))


def agrees_with_autodiff(x: LeafData) -> bool | None:
    """Where the checked gradient mismatches, does it agree with jax.grad? None: no jax.grad."""
    if x.agree is None or x.autodiff_cmp is None:
        return None
    return bool(np.all(x.agree | (x.cmp.status != MISMATCH)))


@dataclasses.dataclass(frozen=True)
class Triage:
    """The verdict, and the mismatched leaves by who is wrong."""

    verdict: Verdict
    wrong: list  # the checked gradient is wrong (jax.grad agrees with finite differences)
    suspect: list  # the checked gradient and jax.grad agree, not finite differences
    conflict: list  # all three disagree


def triage(leaves: list[LeafReport], agrees: dict[str, bool | None],
           checking_autodiff: bool) -> Triage:
    """Who is wrong in each mismatched leaf. `agrees` maps a mismatched leaf's path to whether
    the checked gradient agrees with jax.grad there (None when jax.grad is not a separate
    opinion); with no mismatch the verdict is ok, or unresolved where a leaf is."""
    bad = [leaf for leaf in leaves if leaf.status == Status.MISMATCH]
    if not bad:
        if any(leaf.status == Status.PRECISION for leaf in leaves):
            return Triage(Verdict.PRECISION, [], [], [])
        unresolved = any(leaf.status == Status.UNRESOLVED for leaf in leaves)
        return Triage(Verdict.UNRESOLVED if unresolved else Verdict.OK, [], [], [])
    wrong, suspect, conflict = [], [], []
    for leaf in bad:
        agree = agrees.get(leaf.path)
        if checking_autodiff or agree is None or leaf.autodiff_status != Status.MISMATCH:
            wrong.append(leaf)
        elif agree:
            suspect.append(leaf)
        else:
            conflict.append(leaf)
    verdict = (Verdict.WRONG_GRADIENT if wrong else
               Verdict.SUSPECT_NUMERICS if suspect and not conflict else Verdict.DISAGREEMENT)
    return Triage(verdict, wrong, suspect, conflict)
