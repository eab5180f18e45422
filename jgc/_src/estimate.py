"""Stages 4 and 5, `estimate` and `compare`: difference quotients, their error, and kinks.

For each checked entry, with exact steps h+ and h- (see plan.py):

    central  D  = (f(x+h+) - f(x-h-)) / (h+ + h-)
    forward  F  = (f(x+h+) - f(x)) / h+
    backward B  = (f(x) - f(x-h-)) / h-

Error model (per entry, absolute):
  * Rounding. Each loss value carries an error of at most KAPPA * u * |f|, where u is the machine
    epsilon of the loss's dtype. KAPPA = 16 covers a sum of up to 2**16 same-signed terms with a
    pairwise (tree) reduction, as XLA does, whose error grows like u * log2(N). The difference
    quotient divides the error of two values by h+ + h-, so its rounding error is
    noise = 2 KAPPA u max|f| / (h+ + h-).
  * Truncation, h**2 |f'''| / 6, is not known in advance. It is measured where it matters: every
    entry whose checked value disagrees with D by more than the rounding error alone allows (a
    "suspect") is evaluated again at twice the step. For a smooth loss D(2h) - D(h) is 3x the
    truncation error of D(h) (Richardson), so |D(2h) - D(h)| / 3 estimates it; it also picks up
    any rounding noise larger than the model predicted.
  * An entry is a mismatch when |checked - D| > TOL_FACTOR * (noise + truncation). TOL_FACTOR = 3
    leaves room for the estimates being estimates (rounding errors are not bounds in practice and
    the truncation term is itself a difference of noisy numbers).

Kinks. Where the loss is smooth, the jump between the one-sided slopes, J(h) = F(h) - B(h), is
h f'' to leading order, so J(2h) = 2 J(h) up to O(h**3). On a kink (relu at 0, a max-pool tie,
|x| at 0) the slopes jump by a fixed amount, so J(2h) = J(h). A suspect whose |J(2h) - 2 J(h)|
exceeds TOL_FACTOR times its rounding noise is therefore not smooth within the stencil; its
checked value is accepted ("kink") when it lies between the one-sided derivatives, estimated by
extrapolating the one-sided slopes at h and 2h to h -> 0, widened by their rounding noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KAPPA = 16.0
TOL_FACTOR = 3.0

OK, KINK, MISMATCH = 0, 1, 2
STATUS_NAMES = {OK: "ok", KINK: "kink", MISMATCH: "mismatch"}


@dataclasses.dataclass(frozen=True)
class Differences:
    """Difference quotients for every planned entry (all checked leaves, concatenated)."""

    f0: float
    central: np.ndarray
    forward: np.ndarray
    backward: np.ndarray
    noise: np.ndarray  # Rounding error of `central` (absolute).
    # Second stencil at twice the step; NaN where it was not evaluated.
    central2: np.ndarray
    forward2: np.ndarray
    backward2: np.ndarray
    noise2: np.ndarray

    @property
    def refined(self) -> np.ndarray:
        return ~np.isnan(self.central2)


def _quotients(f0, fp, fm, hp, hm, u, f_scale):
    with np.errstate(divide="ignore", invalid="ignore"):
        central = (fp - fm) / (hp + hm)
        forward = (fp - f0) / hp
        backward = (f0 - fm) / hm
        size = np.maximum.reduce([np.abs(fp), np.abs(fm), np.full_like(fp, abs(f0)),
                                  np.full_like(fp, f_scale)])
        noise = 2 * KAPPA * u * size / (hp + hm)
    return central, forward, backward, noise


def first_stencil(f0: float, fp, fm, hp, hm, u: float, f_scale: float = 0.0) -> Differences:
    c, f, b, n = _quotients(f0, fp, fm, hp, hm, u, f_scale)
    nan = np.full_like(c, np.nan)
    return Differences(f0, c, f, b, n, nan, nan.copy(), nan.copy(), nan.copy())


def with_second_stencil(d: Differences, where: np.ndarray, fp2, fm2, hp2, hm2, u: float,
                        f_scale: float = 0.0) -> Differences:
    c2, f2, b2, n2 = (a.copy() for a in (d.central2, d.forward2, d.backward2, d.noise2))
    c2[where], f2[where], b2[where], n2[where] = _quotients(d.f0, fp2, fm2, hp2, hm2, u, f_scale)
    return dataclasses.replace(d, central2=c2, forward2=f2, backward2=b2, noise2=n2)


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """Per-entry error bar of the numerical derivative, and where the loss is not smooth."""

    error: np.ndarray  # Absolute error estimate of `central` (rounding + truncation).
    kink: np.ndarray  # bool: the one-sided slopes jump (not smooth within the stencil).
    low: np.ndarray  # Range of the one-sided slopes (widened by noise); used at kinks only.
    high: np.ndarray


def error_model(d: Differences) -> ErrorModel:
    refined = d.refined
    truncation = np.where(refined, np.abs(d.central2 - d.central) / 3, 0.0)
    error = d.noise + truncation
    # In units of noise = rounding error of D(h): F(h) and B(h) carry 2x it, F(2h) and B(2h) 1x,
    # J(h) = F(h) - B(h) 4x, J(2h) 2x, so J(2h) - 2 J(h) carries up to 10x.
    with np.errstate(invalid="ignore"):
        kink = refined & (np.abs((d.forward2 - d.backward2) - 2 * (d.forward - d.backward))
                          > TOL_FACTOR * 10 * d.noise)
    # The one-sided derivatives themselves: F(h) = f'+ + h f''/2 + O(h^2), so 2 F(h) - F(2h)
    # removes the curvature term (likewise for B). A checked value at a kink is one of f'- and
    # f'+ (or between them, e.g. jax's 0.5 at a relu tie); each extrapolation carries 5x noise.
    right = 2 * d.forward - d.forward2
    left = 2 * d.backward - d.backward2
    slopes = np.stack([left, right, d.forward, d.backward, d.forward2, d.backward2])
    widen = TOL_FACTOR * 5 * d.noise
    with np.errstate(invalid="ignore"):
        low = np.where(refined, np.min(slopes, axis=0), np.nan) - widen
        high = np.where(refined, np.max(slopes, axis=0), np.nan) + widen
    return ErrorModel(error, kink, low, high)


def suspects(d: Differences, values: np.ndarray, rtol=None, atol=None,
             value_error: np.ndarray | float = 0.0) -> np.ndarray:
    """Entries where `values` disagree with the first stencil beyond its rounding error."""
    return ~(np.abs(values - d.central) <= tolerance(d.noise + value_error, d.central, rtol,
                                                     atol))


def rounding(values: np.ndarray, eps, scale) -> np.ndarray:
    """Rounding error of a gradient computed in a dtype with machine epsilon `eps`.

    A backprop value is a sum of products along every path through the network; with tree
    reductions its error stays within about KAPPA units of roundoff of the *terms* summed, which
    can be much larger than the value when they cancel. `scale` bounds the terms: the largest
    gradient entry of the same leaf. This matters when the checked gradient is coarser than the
    check (a float32 gradient checked in float64): its last digits are not a bug.
    """
    return KAPPA * eps * np.maximum(np.abs(values), scale)


def tolerance(error, numerical, rtol=None, atol=None) -> np.ndarray:
    """The allowed |checked - numerical|: from the error model, or the user's rtol/atol."""
    if rtol is None and atol is None:
        return TOL_FACTOR * error
    return (atol or 0.0) + (rtol or 0.0) * np.abs(numerical)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One gradient source compared against the numerical estimate, entry by entry."""

    status: np.ndarray  # OK / KINK / MISMATCH per entry.
    abs_error: np.ndarray
    rel_error: np.ndarray


def compare(values: np.ndarray, d: Differences, m: ErrorModel, rtol=None, atol=None,
            value_error: np.ndarray | float = 0.0) -> Comparison:
    """Classifies each entry of `values` against the numerical derivative.

    `value_error` is the rounding error of `values` themselves (see `rounding`), added to the
    numerical derivative's error bar.

    Relative error is |g - D| / max(|g|, |D|, tol): the classic element-wise relative error,
    except that values below the error bar are not divided by (that would report noise as a
    100% error).
    """
    tol = tolerance(m.error + value_error, d.central, rtol, atol)
    diff = np.abs(values - d.central)
    with np.errstate(invalid="ignore"):
        bad = ~(diff <= tol)  # NaN counts as bad.
        at_kink = bad & m.kink & (values >= m.low) & (values <= m.high)
    status = np.where(bad, MISMATCH, OK)
    status[at_kink] = KINK
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.maximum.reduce([np.abs(values), np.abs(d.central), tol])
        rel = np.where(diff == 0, 0.0, diff / denom)
    return Comparison(status, diff, rel)
