"""Stage 6, `diagnose`: per-leaf results, bug patterns, and who is wrong.

Three-way triage, per mismatched leaf (checked = the hand-written gradient):
  * checked vs numerical disagree, jax.grad agrees with numerical: the hand-written gradient
    is wrong.
  * checked and jax.grad agree with each other, not with numerical: the numerics are suspect
    (a kink, precision, the step) or the loss is not differentiable at params.
  * all three disagree: no source can be trusted on that leaf.
With grad=None, jax.grad itself is checked (this is how custom_vjp/custom_jvp rules are tested).

A pattern is a one-parameter model of the bug that explains the discrepancy g - D (g checked,
D numerical) almost entirely: the model's residual must be below 1% of |g - D| plus the error
bar. Patterns: "zero" (g == 0), "sign" (g = -D), "scale" (g = a D), "transpose" (g = D.T),
"regularization" (g = D + lam * theta: a term proportional to the parameters added or missing).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jgc._src.estimate import KINK, MISMATCH, TIE, TOL_FACTOR, Comparison
from jgc._src.estimate import chi2 as es_chi2
from jgc._src.estimate import resolution as es_resolution
from jgc._src.report import LeafReport as LeafReport
from jgc._src.report import pct
from jgc._src.tree import LeafSpec

EXPLAINED = 0.01  # A pattern must leave less than 1% of the discrepancy unexplained.
MIN_FIT = 3  # entries a leaf-level pattern needs
ZERO_FACTOR = 0.05  # a fitted factor below this, with the gradient within its error bars: zero
COARSE = 0.01  # A leaf whose resolution is coarser than 1% gets a note: such bugs can hide.
# A leaf is "unresolved" when the check could not tell its gradient from one 2x too large, its
# negative or zero: each differs from the right one by 100% (or more) of its size.
UNRESOLVED = 1.0
N_WORST = 5


@dataclasses.dataclass(frozen=True)
class Collective:
    """The leaf-level test: residuals against the Richardson reference, taken together.

    A bug too small to push any single entry outside its error bar (a 1% scale error in float32)
    still makes the sum of squared standardised residuals, chi2, exceed what noise allows.
    """

    reference: np.ndarray  # Richardson reference at the entries tested (kinks excluded).
    sd: np.ndarray  # Standard deviation of each residual under noise alone.
    chi2: float
    threshold: float
    where: np.ndarray  # Positions (within the leaf's planned entries) that were tested.

    @property
    def significant(self) -> bool:
        return len(self.where) > 0 and self.chi2 > self.threshold

    def resolution(self) -> float:
        """From the reference, not the checked gradient (a buggy gradient 10x too large would
        claim 10x the resolution); noise adds about one to each squared standardised entry,
        which is taken off the signal."""
        return es_resolution(self.reference, self.sd, self.threshold, bias=len(self.where))

    def fit(self, g: np.ndarray, theta: np.ndarray) -> tuple[str | None, float | None]:
        """A one-parameter pattern that explains the excess, if any: its residual is consistent
        with noise, and it removes at least half of the excess over noise (a real systematic
        error lies along the pattern; biases from crossed kinks point anywhere). Below MIN_FIT
        entries one parameter fits whatever they hold, so the factor is just reported (the
        entries come from the coarse stencils alone, see check._collective)."""
        ref, th = self.reference, theta[self.where]
        g = g[self.where]
        excess = self.chi2 - len(self.where)
        for name, basis, offset in (("scale", ref, 0.0), ("regularization", th, ref)):
            bb = float(basis @ basis)
            if bb == 0:
                continue
            c = float((g - offset) @ basis) / bb
            after = es_chi2(g - offset - c * basis, self.sd)
            if len(self.where) < MIN_FIT or (after <= self.threshold
                                             and self.chi2 - after >= excess / 2):
                return name, c
        return None, None


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
    # Per entry: the rounding bounds of the checked gradient and jax.grad added, for comparing
    # the two with each other at their own precision (no finite differences involved).
    pair_rounding: np.ndarray | float = 0.0
    # Per entry: how far from the numerical derivative a value may lie and still pass (the
    # tolerance, a finer stencil's support, or at a kink half the one-sided slopes' range),
    # for the resolution; None: the tolerance.
    accept_width: np.ndarray | None = None


def _explains(residual, discrepancy, tol) -> bool:
    return np.linalg.norm(residual) <= EXPLAINED * np.linalg.norm(discrepancy) + np.linalg.norm(tol)


def find_pattern(g, d, theta, tol, shape, full: bool, smooth=None
                 ) -> tuple[str | None, float | None]:
    """The simplest model that explains g - d, as (pattern, factor).

    `smooth` (bool per entry) leaves out entries at kinks, whose central difference is no
    derivative. `full`: every entry of the leaf is present, in order (needed for "transpose").
    """
    if smooth is not None and not smooth.all() and smooth.any():
        if full and len(shape) == 2 and shape[0] == shape[1] and shape[0] > 1:
            both = (smooth.reshape(shape) & smooth.reshape(shape).T).ravel()
            if both.any() and _is_transpose(g, d, tol, shape, both):
                return "transpose", None
        return find_pattern(g[smooth], d[smooth], theta[smooth], tol[smooth], shape, False)
    disc = g - d
    if not np.any(np.abs(disc) > tol):
        return None, None
    dd = float(d @ d)
    # Zero: the gradient is zero, or so close that the best factor is (a g/4 is within a float32
    # error bar of zero but is a factor, not a missing gradient).
    if np.all(np.abs(g) <= tol) and np.any(np.abs(d) > tol) and (
            not np.any(g) or dd == 0 or abs(float(g @ d) / dd) < ZERO_FACTOR):
        return "zero", 0.0
    if dd > 0:
        a = float(g @ d) / dd
        if _explains(g - a * d, disc, (1 + abs(a)) * tol):
            # A sign flip when -d itself explains the discrepancy within the error bars (a
            # fitted -0.9988 in float32 is a sign flip, not a factor).
            if a < 0 and _explains(g + d, disc, 2 * tol):
                return "sign", -1.0
            return "scale", a
    if (full and len(shape) == 2 and shape[0] == shape[1] and shape[0] > 1
            and _is_transpose(g, d, tol, shape, np.ones(len(g), bool))):
        return "transpose", None
    tt = float(theta @ theta)
    if tt > 0:
        lam = float(disc @ theta) / tt
        if _explains(disc - lam * theta, disc, 2 * tol):
            return "regularization", lam
    return None, None


def _is_transpose(g, d, tol, shape, keep) -> bool:
    """g = d.T on the entries `keep` (whose transposed positions are trusted too), and d is not
    symmetric there (else a transpose changes nothing)."""
    dt = d.reshape(shape).T.ravel()
    disc = (g - d)[keep]
    return (not _explains((d - dt)[keep], disc, tol[keep])
            and _explains((g - dt)[keep], disc, 2 * tol[keep]))


def leaf_report(x: LeafData, full: bool) -> LeafReport:
    spec, cmp = x.spec, x.cmp
    n = len(x.entries)
    if n == 0:
        return LeafReport(spec.path, spec.shape, spec.dtype, 0, "ok")
    n_mis = int(np.sum(cmp.status == MISMATCH))
    n_tie = int(np.sum(cmp.status == TIE))
    n_kink = int(np.sum(cmp.status == KINK)) + n_tie
    nonfinite = ~np.isfinite(x.checked)
    # A leaf-level excess is a bug only when a systematic pattern explains it (a factor, a
    # term proportional to the parameters): many small real errors are systematic, while kinks
    # crossed by the steps (a conv bias feeding hundreds of relu units, at a float32 step)
    # leave residuals of random sign, 30 standard deviations on a correct Flax CNN.
    fit = (None, None)
    if n_mis == 0 and x.collective is not None and x.collective.significant:
        fit = x.collective.fit(x.checked, x.theta)
    as_whole = fit[0] is not None
    unexplained = n_mis == 0 and not as_whole and x.collective is not None \
        and x.collective.significant
    resolution = _resolution(x, leaf_level=not unexplained)
    zero = x.zero_bound is not None and _verified_zero(x)
    if n_mis or as_whole:
        status = "mismatch"
    elif x.zero_bound is not None and resolution >= UNRESOLVED and not zero:
        status = "unresolved"
    else:
        status = "kink" if n_kink else "ok"
    rows = _worst_rows(x, n_mis, as_whole)
    if nonfinite.any():
        pattern, factor = "nonfinite", None
    elif n_mis:
        # Fit patterns on smooth entries only: at a kink the central difference is no
        # derivative. Where every entry is at a kink, jax.grad (when it passed there) stands in.
        smooth = None if x.kink is None else ~x.kink
        reference = x.numerical
        if smooth is not None and not smooth.any() and x.autodiff is not None \
                and x.autodiff_cmp is not None and not np.any(x.autodiff_cmp.status == MISMATCH):
            reference, smooth = x.autodiff, None
        pattern, factor = find_pattern(x.checked, reference, x.theta, x.tol, spec.shape,
                                       full, smooth)
    elif as_whole:
        pattern, factor = fit
    else:
        pattern, factor = None, None
    ad_status = None
    if x.autodiff_cmp is not None:
        ad_whole = (x.autodiff_collective is not None and x.autodiff_collective.significant
                    and x.autodiff_collective.fit(x.autodiff, x.theta)[0] is not None)
        ad_status = ("mismatch" if np.any(x.autodiff_cmp.status == MISMATCH) or ad_whole else
                     "kink" if np.any(np.isin(x.autodiff_cmp.status, (KINK, TIE))) else "ok")
    top = rows[0] if rows else (None, None, None, None)
    rel = np.full(spec.size, np.nan)  # per entry, NaN where not checked (for plots)
    rel[x.entries] = cmp.rel_error
    return LeafReport(
        spec.path, spec.shape, spec.dtype, n, status,
        resolution=None if zero and resolution >= UNRESOLVED else resolution, zero=zero,
        rel_errors=rel.reshape(spec.shape),
        max_rel_error=float(np.nanmax(np.nan_to_num(cmp.rel_error, nan=np.inf))),
        worst_index=top[0], numerical=top[1], checked=top[2], autodiff=top[3],
        n_mismatch=n_mis, n_kink=n_kink, pattern=pattern, factor=factor,
        autodiff_status=ad_status, worst=rows, n_nonfinite=int(nonfinite.sum()), n_tie=n_tie,
        unexplained_excess=unexplained,
        autodiff_disagrees=_autodiff_disagrees(x))


def _worst_rows(x: LeafData, n_mis: int, as_whole: bool) -> tuple:
    """Up to N_WORST (index, numerical, checked, autodiff) rows, worst first.

    Under a mismatch only mismatched entries are shown (non-finite ones first); a leaf that is
    wrong only taken together ("as a whole") shows none, since each of its entries agrees
    within its error bar.
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
    return tuple((tuple(int(i) for i in np.unravel_index(x.entries[j], x.spec.shape)),
                  float(x.numerical[j]), float(x.checked[j]),
                  None if x.autodiff is None else float(x.autodiff[j]))
                 for j in order[:N_WORST])


def _resolution(x: LeafData, leaf_level: bool = True) -> float:
    """The smallest relative error of the whole leaf the check would detect: the better of the
    leaf-level test in reduced precision (where it has entries, and unless its excess showed it
    cannot be trusted here) and the best-resolved single entry (its error bar, or at a kink the
    half-width of the one-sided slopes' range, or a finer stencil's wider error bar that can
    pass it, relative to the numerical derivative)."""
    finite = np.isfinite(x.checked)
    if not finite.any():
        return 0.0  # every entry is non-finite: a mismatch whatever the resolution
    width = x.tol if x.accept_width is None else x.accept_width
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = width[finite] / np.abs(x.numerical[finite])
    single = float(np.nanmin(ratio)) if np.isfinite(ratio).any() else math.inf
    if x.collective is not None and leaf_level and len(x.collective.where):
        return min(single, x.collective.resolution())
    return single


def _verified_zero(x: LeafData) -> bool:
    """A gradient that is zero, verified in absolute terms.

    A zero gradient has no relative error to resolve (2x zero is zero), so it is verified when
    finite differences are consistent with zero at every entry and the gradients are zero to
    rounding on the scale of the whole gradient: a parameter the loss does not depend on, or a
    bias in front of a normalisation, whose gradient is zero up to the rounding of terms that
    cancel. A small but deliberate gradient (1e-14, far above its own rounding) is not zero:
    below resolution it is unresolved.
    """
    with np.errstate(invalid="ignore"):
        return (bool(np.all(np.abs(x.numerical) <= x.tol))
                and bool(np.all(np.abs(x.checked) <= x.zero_bound))
                and (x.autodiff is None
                     or bool(np.all(np.abs(x.autodiff) <= x.autodiff_zero_bound))))


def _autodiff_disagrees(x: LeafData) -> bool:
    """jax.grad and the checked gradient differ somewhere in the leaf beyond their own rounding
    (both are computed, not measured, so finite differences' error bars do not enter)."""
    if x.autodiff is None:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.any(~(np.abs(x.checked - x.autodiff)
                             <= TOL_FACTOR * np.asarray(x.pair_rounding))))


def skipped_report(spec: LeafSpec) -> LeafReport:
    return LeafReport(spec.path, spec.shape, spec.dtype, 0, "skipped", reason=spec.reason)


# -- plain words ----------------------------------------------------------------------------

def _near(a: float, b: float, rel: float = 2e-3) -> bool:
    return abs(a - b) <= rel * abs(b)


# A factor within this of 1 is a small relative error, not "1x too large": it is worded as a
# percentage (a 1.002 factor is 0.2% too large, not "a constant 1 where 1 was meant").
NEAR_ONE = 0.02
# Beyond this a factor is printed in scientific notation and no integer cause is guessed.
HUGE = 1e6


def describe_factor(a: float, batch: int | None) -> str:
    """'4× too large: ...' with the likely cause of a constant factor (any finite factor)."""
    m = abs(a)
    if a < 0:
        size = f"has the wrong sign and is {m:.3g}× the right magnitude"
    elif abs(a - 1) <= NEAR_ONE:
        side = "large" if a > 1 else "small"
        return (f"is {abs(a - 1) * 100:.2g}% too {side} (a factor {a:.4g}): a small relative "
                "error, such as a constant slightly off (a regularisation or epsilon term, a "
                "learning-rate-like scale) or a term computed at a slightly different point")
    elif m < 1 / HUGE:
        size = f"is {a:.3g}× the right value (almost zero)"
    elif a >= 1:
        size = (f"is {round(a)}× too large" if a < HUGE and _near(a, round(a))
                else f"is {a:.3g}× too large")
    else:
        inv = 1 / a
        size = (f"is {round(inv)}× too small" if inv < HUGE and _near(inv, round(inv))
                else f"is {a:.3g}× the right value (too small)")
    causes = []
    if batch and batch > 1:
        if _near(m, batch):
            causes.append(f"a 1/m averaging factor is missing (m = {batch}, the batch size)")
        elif _near(m, 1 / batch):
            causes.append(f"it is divided by the batch size m = {batch} once too often")
    if not causes:
        if _near(m, 2):
            causes.append("a factor 2 counted twice (e.g. d(x²)/dx = 2x with the 2 applied "
                          "again, or a term added twice)")
        elif _near(m, 0.5):
            causes.append("a factor 2 is missing (e.g. d(x²)/dx taken as x)")
        elif 1 < a < HUGE and _near(a, round(a)):
            causes.append(f"a constant {round(a)} where 1 was meant (e.g. {round(a)}./m "
                          "instead of 1./m, or a term counted several times)")
        else:
            causes.append("a constant factor is wrong (a 1/m missing or doubled, a 2 from a "
                          "square, a scale in the loss)")
    return f"{size}: likely {causes[0]}"


def describe_leaf(leaf: LeafReport, source: str, batch: int | None,
                  noun: str = "gradient") -> str:
    """One sentence about a mismatched leaf: its pattern (or its extent) and likely cause."""
    p = leaf.path or "<params>"
    what = f"{_the(source, noun)} of {p}"
    if leaf.pattern in ("scale", "sign"):
        if leaf.pattern == "sign":
            body = f"{what} has the wrong sign (factor -1): likely a subtraction reversed " \
                   "(y - p instead of p - y) or an ascent direction"
        else:
            body = f"{what} {describe_factor(leaf.factor, batch)}"
    elif leaf.pattern == "transpose":
        body = (f"{what} is the transpose of the right gradient: likely X @ dZ.T where "
                "X.T @ dZ was meant, or a weight used as W.T in the forward pass")
    elif leaf.pattern == "regularization":
        lam = leaf.factor
        if lam < 0:
            body = (f"{what} is missing a term proportional to the parameters: the "
                    f"regularisation gradient λ·θ is missing, λ ≈ {abs(lam):.3g}")
        else:
            body = (f"{what} has an extra term proportional to the parameters, λ ≈ {lam:.3g}: "
                    "regularisation counted twice (λ·θ with a loss of ½λθ² gives λ·θ, not "
                    "2λ·θ), or applied to a parameter the loss does not regularise")
    elif leaf.pattern == "zero":
        body = f"{what} is all zeros: it was never computed, or was overwritten"
    elif leaf.pattern == "nonfinite":
        n = leaf.n_nonfinite
        first = f", first at {leaf.worst_index}" if leaf.worst_index is not None else ""
        body = (f"{what} has {n} non-finite entr{'y' if n == 1 else 'ies'} (NaN or Inf){first}"
                f" where finite differences give a finite derivative: a division by zero, a "
                "log or sqrt at 0, or an overflow (exp of a large number) in the computation")
    elif leaf.directions and leaf.n_mismatch and leaf.pattern is None:
        body = (f"{what} is wrong at {leaf.n_mismatch} entr"
                f"{'y' if leaf.n_mismatch == 1 else 'ies'} located by group testing")
    elif leaf.n_mismatch == 0 and leaf.directions:
        body = (f"{what} fails a random-direction test (the values shown are derivatives along "
                "it), beyond its error bar and any kink along it, but group testing isolated no "
                "single wrong entry: the error is spread over many entries, each too small to "
                "show alone (a small factor or an extra term across the leaf)")
    elif leaf.n_mismatch == 0:
        body = (f"{what} is slightly but systematically off: no single entry is outside its "
                "error bar, but taken together the leaf's entries differ from finite "
                "differences far more than the measured noise allows")
    else:
        body = (f"{what} is wrong in {leaf.n_mismatch} of {leaf.n_checked} entries with no "
                "simple pattern (a wrong formula, a wrong index or a missing path)")
    if leaf.directions and leaf.n_mismatch:
        body += (f" (found by {leaf.directions} random-direction tests and group testing, and "
                 "confirmed entry by entry)")
    elif leaf.n_mismatch == 0 and leaf.pattern is not None and not leaf.directions:
        body += " (taken together over the leaf: small, below any single entry's error bar)"
    return body


def worst_lines(leaf: LeafReport, source: str, with_autodiff: bool, k: int = 3,
                autodiff: str = "jax.grad") -> list[str]:
    """The worst entries, one line each; for a leaf wrong only along a random direction, the
    derivatives along it (never entries that agree)."""
    rows = [(f"at {idx}", num, chk, ad) for idx, num, chk, ad in leaf.worst[:k]]
    if not rows and leaf.directions and leaf.numerical is not None:
        rows = [("along the failing direction", leaf.numerical, leaf.checked, leaf.autodiff)]
    out = []
    for where, num, chk, ad in rows:
        line = f"      {where}: numerical {num:.6g}, {source} {chk:.6g}"
        if with_autodiff and ad is not None:
            line += f", {autodiff} {ad:.6g}"
        out.append(line)
    return out


def agrees_with_autodiff(x: LeafData) -> bool | None:
    """Where the checked gradient mismatches, does it agree with jax.grad? None: no jax.grad."""
    if x.agree is None or x.autodiff_cmp is None:
        return None
    return bool(np.all(x.agree | (x.cmp.status != MISMATCH)))


def diagnose(leaves: list[LeafReport], agrees: dict[str, bool | None], *, source: str,
             has_autodiff: bool, autodiff_why: str | None, batch: int | None,
             eps: float | None = None, autodiff: str = "jax.grad",
             noun: str = "gradient", float64: bool = True,
             method: str = "central") -> tuple[str, str]:
    """Returns (verdict, diagnosis text).

    `agrees` maps each mismatched leaf's path to whether the checked gradient agrees with
    jax.grad there (None when jax.grad is not a separate opinion). `float64` and `method` say
    what the check already did, so that its advice never repeats it.
    """
    bad = [leaf for leaf in leaves if leaf.status == "mismatch"]
    unresolved = [leaf for leaf in leaves if leaf.status == "unresolved"]
    kinks = [leaf for leaf in leaves if leaf.n_kink]
    lines: list[str] = []
    checking_autodiff = source == autodiff
    the = functools.partial(_the, noun=noun)
    if not bad:
        verdict = "unresolved" if unresolved else "ok"
        n = sum(leaf.n_checked for leaf in leaves if leaf.status != "unresolved")
        dirs = sum(leaf.directions for leaf in leaves)
        if dirs:
            n_dir_leaves = sum(1 for leaf in leaves if leaf.directions)
            lines.append(f"{_sentence(the(source))} agrees with finite differences along all "
                         f"{dirs} random directions ({n_dir_leaves} leaves)"
                         + (f" and in all {n} entries checked one by one." if n else "."))
        elif n:
            lines.append(f"{_sentence(the(source))} agrees with finite differences in all {n} "
                         "checked entries" + (" of the resolved leaves." if unresolved else "."))
        ad_bad = [leaf for leaf in leaves if leaf.autodiff_status == "mismatch"]
        if ad_bad and not checking_autodiff:
            lines.append(f"Note: {autodiff} disagrees with finite differences in "
                         f"{_paths(ad_bad)} while {the(source)} agrees: if the loss "
                         "uses a jax.custom_vjp or custom_jvp rule, that rule may be wrong.")
    else:
        wrong, suspect, conflict = [], [], []
        for leaf in bad:
            agree = agrees.get(leaf.path)
            if checking_autodiff or agree is None or leaf.autodiff_status != "mismatch":
                wrong.append(leaf)
            elif agree:
                suspect.append(leaf)
            else:
                conflict.append(leaf)
        verdict = ("wrong_gradient" if wrong else
                   "suspect_numerics" if suspect and not conflict else "disagreement")
        if wrong:
            if checking_autodiff:
                lines.append(
                    f"{autodiff} disagrees with finite differences in {_paths(wrong)}. If the "
                    "function uses a jax.custom_vjp or jax.custom_jvp rule, that rule is the "
                    "likely culprit; otherwise see the advice on numerics below.")
            elif has_autodiff:
                lines.append(
                    f"{_sentence(the(source))} is wrong in {_paths(wrong)}: {autodiff} agrees "
                    "with finite differences there, so the bug is in the hand-written "
                    f"{noun}, not in the function or the numerics.")
            else:
                lines.append(
                    f"{_sentence(the(source))} disagrees with finite differences in "
                    f"{_paths(wrong)}. {autodiff} cannot break the tie ({autodiff_why}), but the "
                    "differences are outside the finite differences' error bars (and outside "
                    "the one-sided slopes wherever the loss has a kink), so the hand-written "
                    f"{noun} is the likely culprit.")
            for leaf in wrong:
                lines.append(f"  - {describe_leaf(leaf, source, batch, noun)}.")
                lines += worst_lines(leaf, source, not checking_autodiff, autodiff=autodiff)
        if suspect:
            lines.append(
                f"{_sentence(the(source))} and {autodiff} agree with each other but not "
                "with finite "
                f"differences in {_paths(suspect)}: the numerics are suspect, or the loss is not "
                "differentiable at these parameters.")
            for leaf in suspect:
                lines += worst_lines(leaf, source, True, autodiff=autodiff)
        if conflict:
            lines.append(
                f"All three disagree in {_paths(conflict)}: {the(source)} differs from "
                f"both finite differences and {autodiff}, and {autodiff} differs from finite "
                "differences too. A custom_vjp/custom_jvp rule in the loss may be wrong as well "
                "as the hand-written gradient, or the numerics are unreliable here.")
            for leaf in conflict:
                lines.append(f"  - {describe_leaf(leaf, source, batch, noun)}.")
                lines += worst_lines(leaf, source, True, autodiff=autodiff)
        if (suspect or conflict or checking_autodiff) and eps is not None:
            lines.append(f"The step was fixed by hand (eps={eps:g}): first try eps=None, which "
                         "picks each entry's step from its dtype and magnitude.")
        elif suspect or conflict or checking_autodiff:
            lines.append(
                "To rule out the numerics: evaluate at a random point rather than at zeros or "
                "a symmetric initialisation (ties and kinks), keep x64=True, try another step "
                "(eps=1e-4 or 1e-7), and look for branches (relu, max, abs, where, sort) that sit "
                "exactly at a switch for these parameters.")
    rough = [leaf for leaf in leaves if leaf.unexplained_excess and leaf.status != "mismatch"]
    if rough:
        lines.append(
            f"Taken together, the residuals of {_paths(rough)} exceed the loss's noise, but in "
            "no systematic pattern (no constant factor, no term proportional to the "
            "parameters): the steps crossed kinks (relu units switching within h), which "
            "biases finite differences at random. That is not a gradient bug; every entry "
            "passed against its own error bar, and the resolution is what single entries "
            "give.")
    if unresolved:
        lines += _unresolved_lines(unresolved, source, noun, autodiff, checking_autodiff,
                                   float64, method)
    coarse = [leaf for leaf in leaves if leaf.status in ("ok", "kink")
              and leaf.resolution is not None and leaf.resolution > COARSE]
    if coarse:
        worst = max(coarse, key=lambda leaf: leaf.resolution)
        lines.append(
            f"Resolution: the finite differences' error bar (rounding noise, or truncation at "
            f"this step) is large next to the gradient of {_paths(coarse)}, so errors smaller "
            f"than {pct(worst.resolution)} of {worst.path or '<params>'} could go unseen. "
            + _resolution_advice(float64, method))
    for leaf in kinks:
        n = leaf.n_kink - leaf.n_tie
        if n:
            lines.append(
                f"{n} entr{'y' if n == 1 else 'ies'} of {leaf.path or '<params>'} "
                f"sit{'s' if n == 1 else ''} on a kink (a relu at 0, a max-pool tie, "
                "|x| at 0): the loss is not differentiable there and the one-sided slopes "
                "differ. The checked value lies between them, so that is expected, not a "
                "failure.")
        if leaf.n_tie:
            t = leaf.n_tie
            lines.append(
                f"{t} entr{'y' if t == 1 else 'ies'} of {leaf.path or '<params>'} "
                f"sit{'s' if t == 1 else ''} at a tie: several elements (relu units, "
                "max-pool inputs) are exactly at their kinks along "
                f"{'this coordinate' if t == 1 else 'these coordinates'}, some turning on "
                "to the right and others to the left, so the derivative is undefined and a "
                "convention (jax.grad's relu'(0) = 0, or a mask z >= 0) can lie outside both "
                "one-sided slopes. Not a failure; to verify these entries, check at a point "
                "without ties (random, non-integer inputs and biases).")
    return verdict, "\n".join(lines)


def _resolution_advice(float64: bool, method: str) -> str:
    """How to resolve more, never repeating what the check already did."""
    steps = []
    if not float64:
        steps.append("check in float64 (x64=True)")
    if method != "richardson":
        steps.append("use method='richardson' (one more digit, 3x the cost)")
    steps.append("make the gradient larger next to the loss (a loss dominated by a large "
                 "constant, such as 1 + small terms, keeps only the constant's digits)")
    return "To resolve them: " + "; or ".join(steps) + "."


def _unresolved_lines(unresolved, source, noun, autodiff, checking_autodiff, float64, method):
    the = _the(source, noun)
    lines = [
        f"Unresolved: finite differences cannot resolve the {noun} of {_paths(unresolved)}: "
        "the error bar of the difference quotients (rounding noise of the loss, or "
        f"truncation) is at least as large as the {noun} itself, so {the} could be 2× too "
        "large, of the wrong sign, or zero there without any test failing. Nothing was "
        "verified in these leaves, so the check is not ok. " + _resolution_advice(float64, method)]
    if checking_autodiff or all(leaf.autodiff is None for leaf in unresolved):
        return lines
    split = [leaf for leaf in unresolved if leaf.autodiff_disagrees]
    same = [leaf for leaf in unresolved if not leaf.autodiff_disagrees]
    if split:
        lines.append(
            f"{_sentence(the)} and {autodiff} disagree in {_paths(split)}, beyond their "
            "rounding: one of them is wrong there, but finite differences cannot tell which.")
        for leaf in split:
            lines += worst_lines(leaf, source, True, autodiff=autodiff)
    if same:
        lines.append(f"{_sentence(the)} and {autodiff} agree with each other to rounding in "
                     f"{_paths(same)}, which finite differences cannot confirm.")
    return lines


def _paths(leaves: list[LeafReport]) -> str:
    return ", ".join(leaf.path or "<params>" for leaf in leaves)


def _the(source: str, noun: str = "gradient") -> str:
    """'the hand-written gradient' or 'jax.grad' (which is not 'the jax.grad gradient')."""
    return source if source.startswith("jax") else f"the {source} {noun}"


def _sentence(text: str) -> str:
    """Capitalises a sentence start, except a code name such as jax.grad."""
    return text if text.startswith("jax") else text[:1].upper() + text[1:]


