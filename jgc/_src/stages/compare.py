"""Stage `compare`: the gradients against the numerical derivative, per leaf, and the Report.

Every surface (check_grad, check_vjp, check_jvp, check_hvp) ends here: its probes' error model
and the gradients at them become one `LeafData` per leaf (diagnose.leaf_report turns each into a
LeafReport), and `build_report` is the one place a Report is made.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax.numpy as jnp
import numpy as np

from jgc._src.report.report import LeafReport, Report
from jgc._src.report.vocab import Method, Status, Verdict
from jgc._src.stages import diagnose as dg
from jgc._src.stages import differences as dq
from jgc._src.stages import errormodel as em
from jgc._src.stages import plan as pl
from jgc._src.stages.patterns import Collective, chi2, chi2_threshold
from jgc._src.stages.split import LeafSpec, Split


def leaf_rounding(a) -> np.ndarray:
    """Per entry of a gradient leaf (flattened): the rounding error it carries in its own
    dtype, bounded on the scale of the leaf's largest entry (see estimate.rounding)."""
    a = np.asarray(a)
    eps = pl.machine_eps(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else 0.0
    a = a.ravel().astype(np.float64)
    finite = np.isfinite(a)
    # A non-finite entry is a mismatch of its own (estimate.compare); it must not widen the
    # error bar of the others, as an Inf scale would.
    scale = float(np.max(np.abs(a[finite]))) if finite.any() else 0.0
    return np.where(finite, em.rounding(a, eps, scale), 0.0)


def restricted(plan: pl.Plan, leaves: list[np.ndarray]) -> np.ndarray:
    """The planned entries of each checked leaf, concatenated."""
    parts = [np.asarray(a, np.float64).ravel()[e] for a, e in zip(leaves, plan.entries)]
    return np.concatenate(parts) if parts else np.zeros(0)


def restricted_rounding(plan: pl.Plan, leaves: list[np.ndarray]) -> np.ndarray:
    """Per planned entry: the rounding error the gradient carries in its own dtype."""
    parts = [leaf_rounding(a)[e] for a, e in zip(leaves, plan.entries)]
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclasses.dataclass(frozen=True)
class Compared:
    """A set of probes: the error model, and the checked gradient (and jax's) against it."""

    model: em.ErrorModel
    cmp: em.Comparison
    cmp_ad: em.Comparison | None
    g: np.ndarray
    g_round: np.ndarray | float
    g_ad: np.ndarray | None
    ad_round: np.ndarray | float
    tol: np.ndarray  # allowed |g - model.value| per probe
    accept: np.ndarray  # how far a value may lie and still pass (estimate.acceptance)
    agree: np.ndarray | None  # the checked gradient agrees with jax's, per probe

    def take(self, where) -> Compared:
        """The probes `where` (a slice or an index array); the model stays whole."""
        def cut(x):
            return x[where] if isinstance(x, np.ndarray) and x.ndim else x

        return Compared(self.model, _cut_cmp(self.cmp, where),
                        None if self.cmp_ad is None else _cut_cmp(self.cmp_ad, where),
                        cut(self.g), cut(self.g_round),
                        None if self.g_ad is None else cut(self.g_ad), cut(self.ad_round),
                        cut(self.tol), cut(self.accept),
                        None if self.agree is None else cut(self.agree))


def _cut_cmp(c: em.Comparison, where) -> em.Comparison:
    return em.Comparison(c.status[where], c.abs_error[where], c.rel_error[where])


def concatenate(parts: list[Compared]) -> Compared:
    """Several sets of probes as one (check_jvp's directions, measured in groups)."""
    def cat(get):
        values = [get(p) for p in parts]
        if any(v is None for v in values):
            return None
        return np.concatenate([np.broadcast_to(v, p.g.shape) for v, p in zip(values, parts)])

    def cmp(get):
        values = [get(p) for p in parts]
        if any(v is None for v in values):
            return None
        return em.Comparison(*(np.concatenate([getattr(v, f) for v in values])
                               for f in ("status", "abs_error", "rel_error")))

    return Compared(em.concat_models([p.model for p in parts]), cmp(lambda p: p.cmp),
                    cmp(lambda p: p.cmp_ad), cat(lambda p: p.g), cat(lambda p: p.g_round),
                    cat(lambda p: p.g_ad), cat(lambda p: p.ad_round), cat(lambda p: p.tol),
                    cat(lambda p: p.accept), cat(lambda p: p.agree))


def compared(model: em.ErrorModel, cmp: em.Comparison, cmp_ad: em.Comparison | None, g, g_round,
             g_ad, ad_round, rtol=None, atol=None) -> Compared:
    tol = em.tolerance(model.error + g_round, model.value, rtol, atol)
    accept = em.acceptance(model, tol, g_round, rtol, atol)
    agree = None if g_ad is None else np.abs(g - g_ad) <= tol + dq.TOL_FACTOR * ad_round
    return Compared(model, cmp, cmp_ad, g, g_round, g_ad, ad_round, tol, accept, agree)


def collective(model: em.ErrorModel, sl: slice, g: np.ndarray, g_round,
               floor: float = 0.0, kinks: int = 0) -> Collective:
    """The leaf-level test: are the leaf's residuals, taken together, larger than noise?

    Against the Richardson reference (truncation O(h**4), negligible for a smooth loss), each
    residual's standard deviation comes from the measured noise and the gradient's own rounding
    (its bound is NOISE_SIGMAS standard deviations). Kinks are left out: their reference is not
    a derivative; so are entries whose refined estimate left the coarse one (their reference is
    biased by a kink the coarse stencils crossed). Kinks crossed but not flagged leave residuals
    too: the diagnosis calls an excess in a leaf of MIN_FIT entries or more a bug only when a
    systematic pattern explains it (diagnose.Collective.fit).
    """
    keep = ~model.kink[sl] & model.coarse[sl]
    ref = model.reference[sl][keep]
    rounding = np.broadcast_to(g_round, g.shape)[keep]
    g = g[keep]
    sd = np.sqrt(model.reference_sd[sl][keep] ** 2 + (rounding / dq.NOISE_SIGMAS) ** 2)
    debiased = None if model.debiased is None else model.debiased[sl][keep]
    crossed = model.crossed is not None and bool(model.crossed[sl].any())
    return Collective(ref, sd, chi2(g - ref, sd), chi2_threshold(int(keep.sum())),
                      np.flatnonzero(keep), floor, debiased, crossed, kinks)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What judging a leaf needs beyond its numbers: whether resolution is judged (None: the
    user fixed the tolerance), and the zero-to-rounding bounds of each gradient."""

    zero: float | None
    autodiff_zero: float = 0.0
    leaf_test: bool = False  # the leaf-level test (reduced precision, measured noise)
    # The smallest leaf-level pattern (a relative factor or term) that counts: see
    # `pattern_floor`.
    pattern_floor: float = 0.0
    # The loss's own rounding, KAPPA u max(|f0|, f_scale): a gradient entry g_j whose change of
    # the loss over a relative change of its parameter, |g_j| max(1, |theta_j|), stays below it
    # is zero at the loss's precision (diagnose._verified_zero).
    loss_rounding: float = 0.0


def pattern_floor(u: float, method: str) -> float:
    """The relative size below which a leaf-level pattern is not a finding: TOL_FACTOR times
    u**(1 - p), the relative error the method's difference quotients carry at its step
    h = u**p·max(1, |x|) (p = 1/3 for central differences, 1/5 for Richardson) from the loss's
    own rounding when that rounding is smooth at the step's scale, as a special function's
    approximation error is (float32 log1p: a slope error of 5e-5 relative, identical at h and
    2h, invisible to the noise measurement, fitted as a factor 0.99998). Such an error shifts
    every difference quotient of a leaf alike, and below this size nothing tells it from a
    real factor; a 1% bug is 40 times larger in float32."""
    if Method(method) == Method.COMPLEX:  # no subtraction: the derivative's own rounding
        return dq.TOL_FACTOR * u
    return dq.TOL_FACTOR * u ** (1 - Method(method).step_power)


def leaf_data(spec: LeafSpec, entries: np.ndarray, theta: np.ndarray, c: Compared,
              bounds: Bounds, model_slice: slice | None = None) -> dg.LeafData:
    """One leaf's numbers: `c` already cut to the leaf (model cut by `model_slice`)."""
    sl = model_slice if model_slice is not None else slice(None)
    m = c.model
    kinks = kinks_found(m, sl, c.cmp)
    return dg.LeafData(
        spec, entries, theta, m.value[sl], c.tol, c.g, c.cmp, c.g_ad, c.cmp_ad, c.agree,
        kink=m.kink[sl],
        collective=(collective(m, sl, c.g, c.g_round, bounds.pattern_floor, kinks)
                    if bounds.leaf_test else None),
        autodiff_collective=(collective(m, sl, c.g_ad, c.ad_round, bounds.pattern_floor,
                                        kinks)
                             if bounds.leaf_test and c.g_ad is not None else None),
        zero_bound=bounds.zero, autodiff_zero_bound=bounds.autodiff_zero,
        loss_rounding=bounds.loss_rounding,
        slopes=(None if m.slope_low is None else (m.slope_low[sl], m.slope_high[sl])),
        rounding=None if m.rounding is None else m.rounding[sl],
        pair_rounding=(c.g_round + c.ad_round) if c.g_ad is not None else 0.0,
        kinks_found=kinks,
        accept_width=_resolving_width(m, sl, c))


def kinks_found(m: em.ErrorModel, sl: slice, cmp: em.Comparison) -> int:
    """How many of a leaf's entries its steps were seen to cross kinks at: entries at a kink
    or tie (whether or not a gradient needed the kink's range to pass), and entries whose
    estimate left the coarse stencils (a finer level showed them biased: the kink sat between
    h/4 and 2h), mismatches aside (a bug does not vouch for itself). Some more cross kinks
    unseen (diagnose._unseen_kinks, patterns.Collective._shown_widely)."""
    at_kink = np.isin(cmp.status, (dq.KINK, dq.TIE)) | m.kink[sl]
    left = (np.zeros(len(at_kink), bool) if m.coarse is None
            else ~m.coarse[sl] & ~m.kink[sl] & (cmp.status != dq.MISMATCH))
    return int(np.sum(at_kink | left))


def _resolving_width(m: em.ErrorModel, sl: slice, c: Compared) -> np.ndarray:
    """Per entry, how far from the derivative an error must take a value to be caught for sure,
    for the leaf's resolution: how far from the numerical derivative it may lie and pass, plus,
    off a kink, the numerical derivative's own error bar, by which it may sit on either side
    of the derivative. (Without it, a float32 conv kernel's best-resolved entries claimed 0.78%,
    their difference quotients 0.46% high within a tolerance of three error bars, and a 1%
    factor passed at each.) At a kink the width is half the one-sided slopes' range, which
    holds the derivatives already.

    An entry taken as smooth whose jump statistic exceeds dq.BORDERLINE_JUMP is widened by the
    statistic too: a kink the kink test did not see may bias its D(h) by about that much (a
    float32 conv kernel entry with a statistic of 1.0e-3 was 0.86e-3 off, 0.67% of its value,
    against an error bar of 0.23%). Noise alone puts a statistic beyond 3 standard deviations
    on 0.3% of smooth entries, whose widening is then a few of their error bars, no more."""
    width = c.tol if c.accept is None else c.accept
    kink = m.kink[sl]
    width = np.where(kink, width, width + m.error[sl])
    if m.jump_z is None or m.jump_stat is None:
        return width
    with np.errstate(invalid="ignore"):
        doubt = ~kink & (m.jump_z[sl] > dq.BORDERLINE_JUMP)
        return np.where(doubt, width + m.jump_stat[sl], width)


def skipped(spec: LeafSpec) -> LeafReport:
    return LeafReport(spec.path, spec.shape, spec.dtype, 0, Status.SKIPPED, reason=spec.reason)


def global_rel_error(g: np.ndarray, numerical: np.ndarray) -> float:
    """The classic single number ||g - n|| / (||g|| + ||n||); infinite for a non-finite g (Inf
    over Inf would read as NaN)."""
    if not np.all(np.isfinite(g)):
        return math.inf
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.linalg.norm(g) + np.linalg.norm(numerical)
        return float(np.linalg.norm(g - numerical) / den) if den > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Header:
    """How a check ran: what was checked, in which precision, by which method and mode."""

    source: str
    precision: str
    method: str
    mode: str
    step: str
    n_params: int
    autodiff_name: str = "jax.grad"
    noun: str = "gradient"


def build_report(leaves, verdict: Verdict, diagnosis: str, header: Header, *, n_checked: int,
                 n_evaluations: int, start: float, notes=(), noise=None,
                 global_rel: float = math.nan) -> Report:
    """The one place a Report is made."""
    return Report(
        ok=verdict == Verdict.OK, verdict=verdict, leaves=tuple(leaves),
        global_rel_error=global_rel, diagnosis=diagnosis, checked_source=header.source,
        precision=header.precision, method=header.method, mode=header.mode, step=header.step,
        n_params=header.n_params, n_checked=n_checked, n_evaluations=n_evaluations,
        seconds=time.perf_counter() - start, notes=tuple(notes), noise=noise,
        autodiff_name=header.autodiff_name, noun=header.noun)


def randomness_report(sp: Split, header: Header, f0: float, f0_again: float, *,
                      n_evaluations: int, start: float, notes) -> Report:
    leaves = [skipped(s) if not s.checked else
              LeafReport(s.path, s.shape, s.dtype, 0, Status.MISMATCH) for s in sp.specs]
    text = (f"The loss returned different values for identical inputs ({f0!r}, then "
            f"{f0_again!r}): it uses hidden randomness (np.random inside the loss, dropout "
            "drawing its own mask, a global counter). Finite differences of a random function "
            "are meaningless, so no gradient was judged. This is not a gradient bug. Pass the "
            "randomness in explicitly: draw the mask or PRNG key outside the loss and pass it as "
            "an argument, e.g. check_grad(loss, params, X, y, key).")
    header = dataclasses.replace(header, method="-")
    return build_report(leaves, Verdict.RANDOMNESS, text, header, n_checked=0,
                        n_evaluations=n_evaluations, start=start, notes=notes)
