"""Difference quotients: the stencils, and the loss's noise level that bounds their rounding.

For each checked entry and each stencil s (step multiplier 1, 2 or 4), with exact steps h+, h-:

    central  D_s = (f(x+h+) - f(x-h-)) / (h+ + h-)
    forward  F_s = (f(x+h+) - f(x)) / h+
    backward B_s = (f(x) - f(x-h-)) / h-

The noise level is measured with ECnoise (`ecnoise`) and turned into a per-evaluation bound
(`noise_bound`); `Differences` holds every stencil evaluated so far for a set of entries.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jgc._src.report.vocab import Entry

KAPPA = 16.0
TOL_FACTOR = 3.0
# Rounding errors are bounded, roughly Gaussian sums of many small errors: 6 standard deviations
# bound the largest of up to ~1e8 of them (sqrt(2 ln 1e8) = 6.07), so a measured noise level
# sigma becomes the per-evaluation bound NOISE_SIGMAS * sigma.
NOISE_SIGMAS = 6.0

# An entry taken as smooth whose jump statistic (errormodel._jump_statistic) lies beyond this
# many standard deviations may hide a kink. The kink test needs NOISE_SIGMAS (6) so that noise
# is never called a kink, but a kink whose statistic falls between 3 and 6 passes it unseen and
# biases D(h) by about its statistic: on a float32 conv kernel, a statistic of 5.95 standard
# deviations came with D(h) 0.67% off, three of its error bars, and that entry alone claimed a
# resolution of 0.7% while a 1% factor passed there. Such an entry claims its resolution only
# widened by the statistic (compare._resolving_width). It stays in the leaf-level test: an
# excess it makes there is no finding without a pattern that explains it, and leaving out every
# such entry cost that test the largest entries of a float32 conv kernel, and a 1% factor it
# caught. A statistic beyond it is also evidence that the entry's steps cross kinks
# (errormodel.crossing).
BORDERLINE_JUMP = 3.0

# Entry statuses (vocab.Entry), as plain names for the array code here.
OK, KINK, MISMATCH, TIE, ROUGH = Entry.OK, Entry.KINK, Entry.MISMATCH, Entry.TIE, Entry.ROUGH


# -- the loss's noise level ------------------------------------------------------------------

def ecnoise(fvals: np.ndarray, eps: float = 0.0) -> float | None:
    """Noise level (standard deviation) of f from values at equally spaced points.

    Moré & Wild, "Estimating computational noise", SIAM J. Sci. Comput. 33 (2011). The k-th
    differences of a smooth function at a small spacing vanish like s**k, while those of noise
    do not: for independent noise of variance sigma**2, E[(Δ^k f)^2] = C(2k, k) sigma**2. Level k
    is accepted when its differences change sign (noise, not a smooth trend) and its estimate
    agrees within a factor of 4 with the next two levels. Returns None when no level qualifies
    (the points were too far apart, or the noise is below f's resolution), or when the values
    have a kink among them (see `kinked`; `eps`: the values' unit roundoff).
    """
    if kinked(np.asarray(fvals, np.float64), eps):
        return None
    table = np.asarray(fvals, np.float64)
    sigmas, signs_mixed = [], []
    for k in range(1, len(table)):
        table = np.diff(table)
        gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
        sigmas.append(math.sqrt(gamma * float(np.mean(table ** 2))))
        signs_mixed.append(bool(np.any(table > 0) and np.any(table < 0)))
    for k in range(len(sigmas) - 2):
        window = sigmas[k:k + 3]
        if signs_mixed[k] and min(window) > 0 and max(window) <= 4 * min(window):
            return sigmas[k]
    return None


# A second difference this many times larger than the others (and than the values' rounding)
# is a kink, not noise: for noise every second difference has standard deviation sqrt(6) sigma,
# and the largest of a handful exceeds the typical one by 3-4x at most.
SPIKE = 10.0


def staircase(values: np.ndarray) -> bool:
    """Whether equally spaced values are a staircase: constant, or flat runs with isolated jumps
    (exact zero first differences between them). That is a loss rounding its inputs more
    coarsely than the spacing (float32 inside a float64 check); a wider spacing turns its
    stairs into noise. A kink is a change of slope instead, with consecutive nonzero
    differences, and a wider spacing would only cross more kinks."""
    moved = np.diff(values) != 0
    return bool(not moved.all() and not np.any(moved[1:] & moved[:-1]))


def kinked(values: np.ndarray, eps: float) -> bool:
    """Whether equally spaced values straddle a kink (a relu unit switching among them).

    ECnoise assumes a smooth function: a kink puts a single spike into the second differences,
    whose differences then look like noise at every level and can read as noise millions of
    times the real one. Noise spreads over every difference instead. A quantisation staircase
    with a single stair looks the same (see `staircase`).
    """
    d2 = np.abs(np.diff(values, 2))
    if d2.size < 4:
        return False
    j = int(np.argmax(d2))
    rest = np.delete(d2, [i for i in (j - 1, j, j + 1) if 0 <= i < d2.size])
    floor = eps * float(np.max(np.abs(values)))
    typical = max(float(np.sqrt(np.mean(rest ** 2))) if rest.size else 0.0, floor)
    return bool(d2[j] > SPIKE * typical) if typical > 0 else bool(d2[j] > 0)


def noise_bound(sigma: float | None, f_size, u: float, float64: bool):
    """The error bound `delta` of one loss value.

    The measured noise (NOISE_SIGMAS standard deviations) when it is available. In float64 the
    a-priori bound KAPPA·u·|f| is a floor: KAPPA = 16 covers a sum of up to 2**16 same-signed
    terms with a pairwise (tree) reduction, as XLA does, whose error grows like u·log2(N); in
    float64 this floor is far below any bug worth reporting, so the extra sensitivity a lower
    measured value would give is not worth its risk. In lower precision every digit counts, so
    the floor is one unit of roundoff of |f| and the measured noise decides.
    """
    if sigma is None:
        return KAPPA * u * f_size
    return np.maximum((KAPPA if float64 else 1.0) * u * f_size, NOISE_SIGMAS * sigma)


# -- difference quotients ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stencil:
    """Difference quotients at one step multiplier; NaN where not evaluated."""

    central: np.ndarray
    forward: np.ndarray
    backward: np.ndarray
    noise: np.ndarray  # Rounding error bound of `central`.
    width: np.ndarray  # h+ + h-.

    @staticmethod
    def empty(m: int) -> Stencil:
        nan = np.full(m, np.nan)
        return Stencil(nan, nan, nan, nan, nan)

    @property
    def done(self) -> np.ndarray:
        return ~np.isnan(self.central)

    def filled(self, where, f0, fp, fm, hp, hm, delta, shift=None) -> Stencil:
        """`delta`: the error bound of one loss value, per entry. `shift`: (central, forward,
        backward) offsets subtracted from the quotients (see `with_stencil`)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            values = [(fp - fm) / (hp + hm), (fp - f0) / hp, (f0 - fm) / hm,
                      2 * delta / (hp + hm), hp + hm]
            if shift is not None:
                for i, offset in enumerate(shift):
                    values[i] = values[i] - offset
        arrays = [a.copy() for a in (self.central, self.forward, self.backward, self.noise,
                                     self.width)]
        for a, v in zip(arrays, values):
            a[where] = v
        return Stencil(*arrays)


@dataclasses.dataclass(frozen=True)
class Differences:
    """All stencils for every planned entry (all checked leaves, concatenated)."""

    f0: float
    sigma: float | np.ndarray | None  # Measured noise (standard deviation) of one value;
    # an array gives one per probe (the outputs of a vector function, check_jvp).
    u: float  # Unit roundoff of the evaluation.
    float64: bool
    f_scale: float  # A magnitude of the loss's terms, when known (check_vjp), else 0.
    stencils: tuple[Stencil, ...]  # One per SCALES entry.

    @property
    def central(self) -> np.ndarray:
        return self.stencils[0].central

    @property
    def noise(self) -> np.ndarray:
        return self.stencils[0].noise


# Step multipliers of the stencils: h, then 2h (truncation, kinks), 4h (Richardson), then pairs
# of finer steps for probes still in doubt (a kink crossed by the h stencil but not by a finer
# one): h/4 and h/8, h/32 and h/64, h/256 and h/512. The finer ones are relative to the central
# step u**(1/3), also under Richardson.
SCALES = (1.0, 2.0, 4.0, 1 / 4, 1 / 8, 1 / 32, 1 / 64, 1 / 256, 1 / 512, 64.0, 128.0)
LEVELS = ((3, 4), (5, 6), (7, 8))  # refinement pairs (a, a / 2), finer and finer
FINE, FINER = LEVELS[0]
# A coarser pair (64h, 128h), for mismatches only: a derivative that depends on the step's
# scale (see `scale_dependent`).
COARSER = (9, 10)
ROUGH_PROBES = 64  # the mismatches per call the coarser pair is tried on (the worst first)
# How many refinement levels a probe in doubt may take. In float64 the rounding error of
# D(h/512) is still ~1e-8 of the derivative; in reduced precision it grows 512x from ~1e-4, so
# two levels (h/64) are the useful limit.
MAX_LEVELS = {True: 3, False: 2}


def differences(f0: float, m: int, sigma: float | None, u: float, float64: bool,
                f_scale: float = 0.0) -> Differences:
    return Differences(f0, sigma, u, float64, f_scale, tuple(Stencil.empty(m) for _ in SCALES))


def with_stencil(d: Differences, s: int, where: np.ndarray, fp, fm, hp, hm, f0=None,
                 shift=None) -> Differences:
    """Fills stencil s at `where`. `f0`: the unperturbed value per entry, when the entries are
    the outputs of a vector function (check_jvp); by default the loss's d.f0.

    `shift` (central, forward, backward) is subtracted from the difference quotients: for a
    probe along a direction, whose displacement at each scale is exact but not exactly the
    scale times the displacement at h, it is how much the checked directional change differs
    from its value at h, so that every stencil compares with one checked value.
    """
    f0 = d.f0 if f0 is None else f0
    size = np.maximum.reduce([np.abs(fp), np.abs(fm), np.broadcast_to(np.abs(f0), fp.shape),
                              np.full(len(fp), d.f_scale)])
    sigma = d.sigma
    if sigma is not None and np.ndim(sigma):  # per probe: those at `where`
        sigma = np.asarray(sigma)[where]
    delta = noise_bound(sigma, size, d.u, d.float64)
    stencils = list(d.stencils)
    stencils[s] = stencils[s].filled(where, f0, fp, fm, hp, hm, delta, shift)
    return dataclasses.replace(d, stencils=tuple(stencils))
