"""The error model and the comparison (stage `compare`'s arithmetic): how far a difference quotient
can be from the derivative, and whether a checked value is within that.

Error model (per entry, absolute):
  * Rounding. Each loss value carries an error of at most `delta` (see `noise_bound`): the
    loss's *measured* noise (ECnoise) or, in float64, the a-priori bound KAPPA·u·|f|, whichever
    is larger. The rounding error of D_s is then 2·delta / (h+ + h-).
  * Truncation, h**2 |f'''| / 6, is not known in advance. It is measured where it matters: every
    entry whose checked value disagrees with D_1 by more than the rounding error alone allows (a
    "suspect") is evaluated again at twice the step. For a smooth loss D_2 - D_1 is 3x the
    truncation error of D_1 (Richardson), so |D_2 - D_1| / 3 estimates it; it also picks up any
    noise larger than the model predicted.
  * An entry is a mismatch when |checked - D| > TOL_FACTOR * (rounding + truncation). TOL_FACTOR
    = 3 leaves room for the truncation term being itself a difference of noisy numbers.

method="richardson" evaluates every entry at h, 2h and 4h and uses R_1 = (4 D_1 - D_2) / 3, whose
truncation error is O(h**4); R_1 - R_2 is 15x that error, so |R_1 - R_2| / 15 estimates it.

Kinks. Where the loss is smooth, the jump between the one-sided slopes, J(h) = F(h) - B(h), is
h f'' to leading order, so J(2h) = 2 J(h) up to O(h**3). On a kink (relu at 0, a max-pool tie,
|x| at 0) the slopes jump by a fixed amount, so J(2h) = J(h). A suspect whose |J(2h) - 2 J(h)|
exceeds TOL_FACTOR times its rounding error is therefore not smooth within the stencil; its
checked value is accepted ("kink") when it lies between the one-sided derivatives, estimated by
extrapolating the one-sided slopes at h and 2h to h -> 0, widened by their rounding error.

Many small errors are the leaf-level test's (patterns.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jgc._src.report.vocab import Method
from jgc._src.stages.differences import (
    BORDERLINE_JUMP,
    KAPPA,
    KINK,
    LEVELS,
    MISMATCH,
    NOISE_SIGMAS,
    OK,
    SCALES,
    TIE,
    TOL_FACTOR,
    Differences,
    Stencil,
)

# -- the error model --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """Per-entry reference value, its error bar, and where the loss is not smooth."""

    value: np.ndarray  # The numerical derivative (D_1, or R_1 for Richardson).
    error: np.ndarray  # Absolute error bound of `value` (rounding + truncation).
    kink: np.ndarray  # bool: the one-sided slopes jump (not smooth within the stencil).
    low: np.ndarray  # Range of the one-sided derivatives (widened by noise); at kinks only.
    high: np.ndarray
    reference: np.ndarray  # Richardson R_1 where both h and 2h exist, else NaN.
    reference_sd: np.ndarray  # Standard deviation of `reference` from the measured noise.
    # bool: the estimate is the coarse level's (not refined, or every finer level agreed), so
    # `reference` may be trusted; elsewhere a finer level showed the coarse stencils biased.
    coarse: np.ndarray | None = None
    # Where the probe was refined: the finest smooth level that resolves its value, a second
    # chance for the checked value (NaN elsewhere; see `compare`).
    support_value: np.ndarray | None = None
    support_error: np.ndarray | None = None
    # bool: a kink confirmed at the finest steps (the jump between the one-sided slopes stays as
    # they shrink), where a tie convention may lie outside the slopes (see `compare`).
    tie: np.ndarray | None = None
    # The one-sided derivatives extrapolated to zero step from the finest stencils, and their
    # uncertainty (extrapolation and noise); NaN where not refined.
    left: np.ndarray | None = None
    right: np.ndarray | None = None
    side_error: np.ndarray | None = None
    # The range of the one-sided derivatives at every probe (extrapolated to zero step, widened
    # by their noise): where two gradients both lie in it they may be two conventions at a tie
    # the kink test could not see (diagnose._autodiff_disagrees).
    slope_low: np.ndarray | None = None
    slope_high: np.ndarray | None = None
    # The rounding part of the coarse error bar (the h stencil's noise): where `error` is much
    # larger, truncation dominates, the loss varying faster than the step can follow.
    rounding: np.ndarray | None = None
    # The coarse level's jump statistic in its standard deviations (NaN where 2h was skipped):
    # below NOISE_SIGMAS the entry counts as smooth, but beyond differences.BORDERLINE_JUMP its
    # resolution is widened (compare._resolving_width).
    jump_z: np.ndarray | None = None
    jump_stat: np.ndarray | None = None  # the statistic itself, |J(2h) - 2 J(h)|
    # 2 D(h) - D(2h): the difference quotient with a bias linear in the step removed (NaN
    # where 2h was skipped). Kinks crossed by the steps bias D(s) by about that: each kink at
    # distance t < s adds its jump times (s - t) / 2s, and with kinks spread evenly over the
    # step the sum grows like s (patterns.Collective uses it to tell such a bias from a bug).
    debiased: np.ndarray | None = None
    # The one-sided slopes' range at every stencil evaluated, intersected (`_spread`): where
    # each stencil's slopes F(s) and B(s), widened by their noise, all contain a value, kinks
    # crossed unseen could explain its distance from the central differences. NaN where the
    # steps are not known to cross kinks (`crossing`, applied by estimate.derivative).
    spread_low: np.ndarray | None = None
    spread_high: np.ndarray | None = None
    # bool: the probe's steps are known to cross kinks (`crossing`; None: not judged).
    crossed: np.ndarray | None = None


def concat_models(models: list[ErrorModel]) -> ErrorModel:
    """Several error models as one, probe sets concatenated."""
    def cat(name):
        values = [getattr(m, name) for m in models]
        return None if any(v is None for v in values) else np.concatenate(values)

    return ErrorModel(*(cat(f.name) for f in dataclasses.fields(ErrorModel)))


def richardson(d: Differences, s: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """R_s = (4 D_s - D_{s+1}) / 3 and its rounding error bound."""
    a, b = d.stencils[s], d.stencils[s + 1]
    return (4 * a.central - b.central) / 3, (4 * a.noise + b.noise) / 3


def _jump_statistic(a: Stencil, b: Stencil) -> tuple[np.ndarray, np.ndarray]:
    """J(a) - 2 J(b) for a stencil pair with steps a = 2b, and its standard deviation.

    J(s) = F(s) - B(s) is s f'' + O(s**3) where the loss is smooth, so J(a) - 2 J(b) vanishes to
    O(a**3); a kink between x and x +- a makes it jump. The statistic is
    (f(x+a) + f(x-a) - 4 f(x+b) - 4 f(x-b) + 6 f(x)) / a: with each value's noise of standard
    deviation delta / NOISE_SIGMAS (delta: its bound), its standard deviation is
    sqrt(1 + 1 + 16 + 16 + 36) / 2 = 4.18 times delta / (NOISE_SIGMAS b) = 0.70 b.noise.
    """
    stat = (a.forward - a.backward) - 2 * (b.forward - b.backward)
    return stat, math.sqrt(70) / 2 / NOISE_SIGMAS * b.noise


def _level(a: Stencil, b: Stencil, coarse_first: bool):
    """One pair of stencils as an estimate: value, error, smooth, done, one-sided range, and
    the extrapolated one-sided derivatives.

    `coarse_first`: the pair is (h, 2h): the value is D(h), whose truncation is
    |D(2h) - D(h)| / 3. Otherwise (a, a/2): the value is D(a), less noisy than D(a/2), whose
    truncation is |D(a) - D(a/2)| * 4/3 (D(a) - D(a/2) is 3x the truncation of D(a/2), a quarter
    of D(a)'s).
    """
    small, large = (a, b) if coarse_first else (b, a)
    value = a.central
    with np.errstate(invalid="ignore"):
        truncation = np.abs(b.central - a.central) * (1 / 3 if coarse_first else 4 / 3)
    if coarse_first:
        # 2h is skipped (float64, central differences) only where every gradient agrees with
        # D(h) within D(h)'s rounding error (`suspects`). There D(h)'s truncation, of order
        # h^2 f^(3) with h ~ u^(1/3), is below that rounding: 0 here, not unknown. (Unknown
        # made every such entry a mismatch until refined at h/4 and h/8: three times the
        # evaluations of a float64 full check, for the same verdict.)
        truncation = np.where(b.done, truncation, 0.0)
    with np.errstate(invalid="ignore"):
        stat, sd = _jump_statistic(large, small)
        smooth = ~(np.abs(stat) > NOISE_SIGMAS * sd)  # NaN (not computed): smooth
        jump_z = np.abs(stat) / sd
        # The jump between the one-sided slopes at the smaller step, and the smallest jump the
        # statistic can see at this level (see `_decisive`).
        jump = np.abs(small.forward - small.backward)
        sees = NOISE_SIGMAS * sd
    # The one-sided derivatives: F(s) = f'+ + s f''/2 + O(s^2), so 2 F(small) - F(large) removes
    # the curvature term (likewise for B). A checked value at a kink is one of f'- and f'+ (or
    # between them, e.g. jax's 0.5 at a relu tie); each extrapolation carries 5x noise.
    right = 2 * small.forward - large.forward
    left = 2 * small.backward - large.backward
    slopes = np.stack([left, right, small.forward, small.backward, large.forward,
                       large.backward])
    widen = TOL_FACTOR * 5 * small.noise
    with np.errstate(invalid="ignore"):
        side = np.abs(right - small.forward) + np.abs(left - small.backward) + widen
        return dict(value=value, error=a.noise + truncation, smooth=smooth, done=small.done,
                    low=np.min(slopes, axis=0) - widen, high=np.max(slopes, axis=0) + widen,
                    left=left, right=right, side=side, jump=jump, sees=sees, jump_z=jump_z,
                    jump_stat=np.abs(stat),
                    persistent=_persistent_jump(large, small))


def _walk(levels: list[dict], finest: np.ndarray, walking: np.ndarray, stop: int):
    """Per probe, from its finest level towards level `stop`, while each coarser level is smooth
    and agrees with the estimate so far within both error bars: (the level reached, its value,
    its error bar widened to the largest discrepancy seen on the way)."""
    pick = lambda key, at: np.choose(at, [lv[key] for lv in levels])  # noqa: E731
    best = finest.copy()
    value, error = pick("value", best), pick("error", best)
    walking = walking.copy()
    for i in range(len(levels) - 2, stop - 1, -1):
        lv = levels[i]
        with np.errstate(invalid="ignore"):
            gap = np.abs(lv["value"] - value)
            agree = gap <= TOL_FACTOR * (lv["error"] + error)
        step = walking & (best == i + 1) & lv["smooth"] & agree
        best = np.where(step, i, best)
        value = np.where(step, lv["value"], value)
        error = np.where(step, np.fmax(lv["error"], gap), error)
        walking &= step | (best != i + 1)
    return best, value, error


def error_model(d: Differences, method: str = Method.CENTRAL) -> ErrorModel:
    """Per probe: the numerical derivative, its error bar, and whether the loss has a kink.

    The coarse level (h and, where computed, 2h) gives the estimate; each refinement level is a
    pair of finer steps. Where a probe was refined, the estimate comes from its finest level
    whose stencils are smooth (no jump between the one-sided slopes beyond noise), extended to
    coarser levels as long as they are smooth too and agree with it within both error bars: so
    a kink that the h stencil crossed but a finer one clears is excluded, and the most precise
    consistent level is used. A probe is at a kink when even its finest level is not smooth:
    then any value between the one-sided slopes at that level is a valid one-sided derivative.
    """
    s1, s2, s4 = d.stencils[:3]
    coarse = _level(s1, s2, coarse_first=True)
    ref_truncation = 0.0  # Truncation of the Richardson reference: O(h**4), negligible at
    if method == Method.RICHARDSON:  # h = u**(1/3), but not at Richardson's own larger step.
        value, noise = richardson(d, 0)
        r2, _ = richardson(d, 1)
        ref_truncation = np.where(s4.done, np.abs(value - r2) / 15, 0.0)
        coarse.update(value=value, error=noise + ref_truncation)
    coarse["done"] = np.ones(len(s1.central), bool)
    coarse["smooth"] = coarse["smooth"] | ~s2.done  # without 2h there is no statistic
    levels = [coarse] + [_level(d.stencils[a], d.stencils[b], coarse_first=False)
                         for a, b in LEVELS]
    finest = _decisive(levels)
    pick = lambda key, at: np.choose(at, [lv[key] for lv in levels])  # noqa: E731
    kink = ~pick("smooth", finest)
    _with_noise_evidence(levels, finest, kink)
    # From the finest level, walk to coarser ones while they are smooth and consistent: the
    # most precise consistent level gives the estimate, with its own error bar, widened to the
    # discrepancy seen on the way.
    best, value, error = _walk(levels, finest, ~kink, stop=0)
    # Agreeing within a finer level's error bar does not show that the coarse stencils are
    # unbiased below it: a kink at 2/3 of the step biases D by a sixth of the jump while its
    # jump statistic vanishes, and many small kinks crossed at once look like curvature (on a
    # Flax CNN in float32, D(h) = D(2h) three error bars off a correct gradient that D(h/8)
    # confirms). So every refined probe keeps a finer level as support, a second chance for
    # the checked value (see `compare`): the same walk, stopped at the first refinement level,
    # so the most precise refinement level consistent with the finest smooth one, if it still
    # resolves its value (TOL_FACTOR error bars below |value|: it could tell a 100% error).
    # Not simply the finest level: its error bar is 64x the coarse one in float32, wide enough
    # to excuse an 8% error (a complex modReLU layer's dropped phase term, on smooth entries
    # where every level agrees). A bug on a smooth entry is caught at every level alike.
    refined = finest > 0
    # Refinement was tried (the probe was in doubt), even where no finer level was decisive: a
    # tie confirmed at the finest decisive level, the coarse one included, counts (`_decisive`).
    attempted = levels[1]["done"] if len(levels) > 1 else refined
    _, support_value, support_error = _walk(levels, finest, ~kink & refined, stop=1)
    with np.errstate(invalid="ignore"):
        usable = refined & ~kink & (TOL_FACTOR * support_error < np.abs(support_value))
    support_value = np.where(usable, support_value, np.nan)
    support_error = np.where(usable, support_error, np.nan)
    # The kink range: the finest decisive level's, narrowed to a coarser level's where that one
    # sees the kink too and its range lies inside (`_kink_level`).
    at_kink = _kink_level(levels, finest, kink)
    low, high = pick("low", at_kink), pick("high", at_kink)
    low = np.where(kink, low, np.nan)
    high = np.where(kink, high, np.nan)
    reference, _ = richardson(d, 0)
    sigma = d.sigma if d.sigma is not None else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = sigma * np.sqrt(2 * (4 / 3 / s1.width) ** 2 + 2 * (1 / 3 / s2.width) ** 2)
        sd = np.sqrt(sd ** 2 + ref_truncation ** 2)
    nan = np.full(len(value), np.nan)
    with np.errstate(invalid="ignore"):
        # The one-sided derivatives at zero step, 2 F(h) - F(2h) and 2 B(h) - B(2h) (see
        # `_level`): curvature removed, so that on a smooth loss the range shrinks to the
        # derivative and a small factor lies outside it; F(h) and B(h) where 2h was skipped.
        right = np.where(s2.done, 2 * s1.forward - s2.forward, s1.forward)
        left = np.where(s2.done, 2 * s1.backward - s2.backward, s1.backward)
        # 2 F(h) - F(2h) carries sqrt(2**2 + (1/2)**2) of F(h)'s noise bound (`noise`).
        widen = TOL_FACTOR * np.where(s2.done, math.sqrt(4.25), 1.0) * s1.noise
        slope_low = np.fmin(left, right) - widen
        slope_high = np.fmax(left, right) + widen
    return ErrorModel(value, error, kink, low, high, reference, sd, best == 0, support_value,
                      support_error, attempted & pick("persistent", finest),
                      np.where(attempted, pick("left", at_kink), nan),
                      np.where(attempted, pick("right", at_kink), nan),
                      np.where(attempted, pick("side", at_kink), nan), slope_low, slope_high,
                      s1.noise, coarse["jump_z"], coarse["jump_stat"],
                      np.where(s2.done, 2 * s1.central - s2.central, np.nan), *_spread(d, best))


def _spread(d: Differences, best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per probe, the intersection over the stencils its estimate rests on (those of its level
    `best` and finer ones) of the range between each one's one-sided slopes F(s) and B(s),
    widened by TOL_FACTOR times its rounding bound (a one-sided quotient has twice the central
    one's: 2 delta / s against delta / s).

    Kinks between x - s and x + s bias D(s) = (F(s) + B(s)) / 2 by less than half their
    spread: with kinks at t_k, slope jumps j_k of one sign, F(s) - f'(x) and f'(x) - B(s) are
    the sums of j_k (s - |t_k|) / s over the kinks on each side, both of that sign, so f'(x)
    lies between F(s) and B(s). Widely spread kinks (relu units switching all over the step)
    grow F - B in proportion to s, as curvature does, and the jump statistic cannot see them:
    D(h) of a float32 relu LSTM's weight sat 24% off the derivative, its truncation estimated
    at 2%; at another entry D(h/4) and D(h/8) agreed 12% off it. A value outside one of those
    ranges is not the derivative; one inside every range may be (`compare`). For a smooth
    loss F - B = s f'' is small next to most gradients, and the range at 2h alone is about
    D(h)'s own tolerance. Coarser levels the estimate left say nothing of its bias.
    """
    lo, hi = np.full(len(best), -np.inf), np.full(len(best), np.inf)
    levels = [(s, 0) for s in range(3)] + [(s, i + 1) for i, p in enumerate(LEVELS) for s in p]
    for s, level in levels:
        st = d.stencils[s]
        use, widen = st.done & (best <= level), TOL_FACTOR * 2 * st.noise
        with np.errstate(invalid="ignore"):
            lo = np.where(use, np.fmax(lo, np.fmin(st.forward, st.backward) - widen), lo)
            hi = np.where(use, np.fmin(hi, np.fmax(st.forward, st.backward) + widen), hi)
    return lo, hi


def _kink_level(levels: list[dict], finest: np.ndarray, kink: np.ndarray) -> np.ndarray:
    """Per probe at a kink, the level whose one-sided slopes give its range: from the finest
    decisive level towards coarser ones, while each coarser level also sees the kink (is not
    smooth) and its range [low, high] lies inside the one so far, as `_walk` narrows a value.

    The finest level is the one a kink crossed by coarser stencils cannot bias, but its range
    carries its own rounding, 5 error bars of the finest step: in float32 at h/32, on a relu tie
    whose slopes are 8.07 and 9.06, that made the range [4.6, 12.6], and a hand-written value
    1.5x jax.grad's (13.6) passed as a tie convention. A coarser level that sees the same kink
    with a range inside it is consistent with it and more precise (its steps are larger); one
    that crossed another kink, or whose range sticks out, is not used.
    """
    at = finest.copy()
    pick = lambda key: np.choose(at, [lv[key] for lv in levels])  # noqa: E731
    low, high = pick("low"), pick("high")
    walking = kink.copy()
    for i in range(len(levels) - 2, -1, -1):
        lv = levels[i]
        with np.errstate(invalid="ignore"):
            inside = (lv["low"] >= low) & (lv["high"] <= high)
        step = walking & (at == i + 1) & lv["done"] & ~lv["smooth"] & inside
        at = np.where(step, i, at)
        low, high = np.where(step, lv["low"], low), np.where(step, lv["high"], high)
        walking &= step | (at != i + 1)
    return at


def _decisive(levels: list[dict]) -> np.ndarray:
    """Per probe, the finest level that can decide whether the loss has a kink there.

    A finer level clears a kink that coarser stencils crossed when its stencils are smooth:
    unless its statistic is too noisy to see the jump they saw. In float32 the finest level's
    rounding error is 64 times the coarse one's: at a relu tie whose one-sided slopes differ by
    0.31 at every step, the h/64 stencils' jump statistic (0.33) stayed within its noise (0.37),
    so the kink read as cleared, and the finest level's difference quotient, midway between
    the slopes, blamed jax.grad's relu'(0) = 0. A level that is smooth but could not have seen
    the jump of a coarser non-smooth level is not decisive, and neither are the levels beyond
    it: the kink stands at the finest decisive one.
    """
    n = len(levels[0]["value"])
    finest, seen = np.zeros(n, int), np.zeros(n)
    open_ = np.ones(n, bool)  # no undecisive level met yet
    for i, level in enumerate(levels):
        with np.errstate(invalid="ignore"):
            # Twice the smallest jump it can see: a persistent jump of that size gives the
            # statistic |J| (J(a) - 2 J(a/2) = -J), which then clears the threshold by six of
            # its standard deviations; a level whose threshold sits near the jump (0.152
            # against 0.155, a float32 tie) sees it or not by chance.
            decisive = level["done"] & open_ & (~level["smooth"] | (seen == 0)
                                                | ~(2 * level["sees"] >= seen))
            seen = np.where(level["done"] & ~level["smooth"], np.fmax(seen, level["jump"]), seen)
        finest = np.where(decisive, i, finest)
        open_ &= decisive | ~level["done"]
    return finest


# The step multiplier of each level's value: the coarse level's h, then the first (larger) step of
# each refinement pair.
LEVEL_STEPS = (1.0, *(SCALES[a] for a, _ in LEVELS))


def _with_noise_evidence(levels: list[dict], finest: np.ndarray, kink: np.ndarray) -> None:
    """Widens each level's error bar by the noise its disagreement with the next coarser level
    shows, where that disagreement is the signature of noise the error model did not predict.

    The model bounds a value's rounding by the values themselves (KAPPA u |f|) or by the measured
    noise, and neither sees rounding that a loss computed as a cancellation of large terms
    carries: the determinant of a singular matrix is exactly 0 at params and +-4e-12 of LU
    rounding at every perturbed point (terms of 1e4 in float64), so its difference quotients
    grow like 1/s as the step s shrinks (3.6e-8 at h, 7.7e-8 at h/4, -2.5e-7 at h/32, 4.9e-6
    at h/256), each claiming an error bar of 1e-20. A derivative's levels converge instead: the
    gap between levels i-1 and i, times the step of level i, is the change in f that the gap
    stands for; for rounding noise it is the same at every level (the noise amplitude eta), for
    truncation it shrinks like s**3 and for a kink the coarse levels cross it is left behind at
    the first finer level. So where the finest such product is at least an eighth of the
    largest (no convergence: 1/512 per level for truncation) and the finest gap exceeds both
    error bars, every level i gets eta / s_i more error. Probes at kinks keep their slopes'
    logic (see `error_model`).
    """
    n = len(finest)
    gaps = []
    for i in range(1, len(levels)):
        a, b = levels[i - 1], levels[i]
        with np.errstate(invalid="ignore"):
            gap = np.abs(b["value"] - a["value"])
            exceeds = gap > TOL_FACTOR * (a["error"] + b["error"])
        gaps.append((np.where(b["done"], gap * LEVEL_STEPS[i], np.nan), exceeds))
    if not gaps:
        return
    eta = np.stack([g for g, _ in gaps])  # (levels - 1, n)
    last = np.clip(finest - 1, 0, len(gaps) - 1)
    finest_eta = eta[last, np.arange(n)]
    finest_exceeds = np.stack([x for _, x in gaps])[last, np.arange(n)]
    with np.errstate(invalid="ignore"):
        largest = np.nanmax(np.where(np.isnan(eta), -np.inf, eta), axis=0)
        noisy = (~kink & (finest >= 2) & finest_exceeds & (finest_eta * 8 >= largest)
                 & np.isfinite(largest))
    if not noisy.any():
        return
    for i, level in enumerate(levels):
        level["error"] = np.where(noisy, level["error"] + largest / LEVEL_STEPS[i],
                                  level["error"])


def _persistent_jump(large: Stencil, small: Stencil) -> np.ndarray:
    """Where the loss has a true kink at x: the jump between the one-sided slopes, J(s) =
    F(s) - B(s), is significant at the smaller step and about the same at the larger. On a
    smooth loss J(s) = s f'' halves with the step; at a kink it tends to the jump in slope.
    Only then can a tie convention lie outside the slopes without a bug (a fixed step too large
    for a fast-varying loss also looks non-smooth, but its J shrinks with the step).

    J(s) = (f(x+s) + f(x-s) - 2 f(x)) / s has standard deviation sqrt(6) sigma / s, where the
    stencil's `noise` is NOISE_SIGMAS sigma / s: J is significant beyond NOISE_SIGMAS standard
    deviations, sqrt(6) noise. (Twelve noises, as first set, could not confirm a float32 relu
    tie whose slopes differ by 0.033 at every step, three noises of its h stencil.)"""
    j_large, j_small = large.forward - large.backward, small.forward - small.backward
    with np.errstate(invalid="ignore"):
        significant = np.abs(j_small) > math.sqrt(6) * small.noise
        return small.done & significant & (np.abs(j_large - j_small) <= np.abs(j_small) / 2)


def suspects(d: Differences, values: np.ndarray, rtol=None, atol=None,
             value_error: np.ndarray | float = 0.0) -> np.ndarray:
    """Entries where `values` disagree with the first stencil beyond its rounding error."""
    return ~(np.abs(values - d.central) <= tolerance(d.noise + value_error, d.central, rtol,
                                                     atol))


def rounding(values: np.ndarray, eps, scale) -> np.ndarray:
    """Rounding error bound of a gradient computed in a dtype with machine epsilon `eps`.

    A backprop value is a sum of products along every path through the network; with tree
    reductions its error stays within about KAPPA units of roundoff of the *terms* summed, which
    can be much larger than the value when they cancel. `scale` bounds the terms: the largest
    gradient entry of the same leaf. This matters when the checked gradient is coarser than the
    check (a float32 gradient checked in float64): its last digits are not a bug.
    """
    return KAPPA * eps * np.maximum(np.abs(values), scale)


def zero_bound(leaves) -> float:
    """|g| below which a gradient entry is zero to rounding: TOL_FACTOR rounding bounds of the
    gradient's dtype on the scale of its largest finite entry over all leaves (a sum of terms
    that cancel leaves rounding noise of the size of the terms; see `rounding`)."""
    arrays = [np.asarray(a) for a in leaves]
    finite = [np.abs(a[np.isfinite(a)].astype(np.float64)) for a in arrays]
    scale = max((float(a.max()) for a in finite if a.size), default=0.0)
    eps = max((float(jnp.finfo(a.dtype).eps) for a in arrays
               if jnp.issubdtype(a.dtype, jnp.floating)), default=0.0)
    return float(TOL_FACTOR * KAPPA * eps * scale)


def acceptance(m: ErrorModel, tol, value_error=0.0, rtol=None, atol=None) -> np.ndarray:
    """Per probe: how far from m.value a value may lie and still pass (`compare`): the
    tolerance, a finer stencil's support (its value's offset plus its own tolerance), or at a
    kink half the one-sided slopes' range. What the resolution is made of."""
    out = np.asarray(tol, np.float64)
    with np.errstate(invalid="ignore"):
        if m.support_value is not None:
            reach = np.abs(m.support_value - m.value) + tolerance(
                m.support_error + value_error, m.support_value, rtol, atol)
            out = np.fmax(out, reach)
        if m.low is not None:
            out = np.fmax(out, np.where(m.kink, np.fmax(m.value - m.low, m.high - m.value),
                                        np.nan))
        if m.spread_low is not None:
            reach = np.fmax(m.value - m.spread_low, m.spread_high - m.value)
            out = np.fmax(out, np.where(~m.kink & (m.spread_low <= m.spread_high), reach,
                                        np.nan))
    return out


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


def compare(values: np.ndarray, m: ErrorModel, rtol=None, atol=None,
            value_error: np.ndarray | float = 0.0, tie: np.ndarray | bool = False,
            supported: np.ndarray | bool = True) -> Comparison:
    """Classifies each entry of `values` against the numerical derivative.

    `value_error` is the rounding error of `values` themselves (see `rounding`), added to the
    numerical derivative's error bar. Relative error is |g - D| / max(|g|, |D|, tol): the
    classic element-wise relative error, except that values below the error bar are not divided
    by (that would report noise as a 100% error).

    At a kink a value between the one-sided slopes is a valid one-sided derivative (KINK). A
    value outside them is a MISMATCH, unless `tie` allows it there (TIE): when several elements
    sit exactly at their kinks along one coordinate (relu units with integer inputs and zero
    biases), some turn on to the right and others to the left, and a convention such as
    jax.grad's relu'(0) = 0 can lie outside both slopes. The derivative is undefined there; a
    tie is not a failure.

    `supported` (bool per entry): where a finer stencil's support may pass a value the coarse
    estimate refutes (see `second_opinion`).

    Where the model keeps the one-sided slopes' range (`m.spread_low`, only where the steps
    are known to cross kinks: `crossing`), a value the central differences refute but that lies
    between the one-sided slopes of every stencil (`_spread`) is also accepted as at a kink,
    where `supported` allows: kinks crossed unseen may have biased every central difference by
    that much, and finite differences cannot tell such a value from the derivative.
    """
    tol = tolerance(m.error + value_error, m.value, rtol, atol)
    diff = np.abs(values - m.value)
    with np.errstate(invalid="ignore"):
        bad = ~(diff <= tol) | ~np.isfinite(values)  # NaN and Inf are always mismatches.
        if m.support_value is not None:  # confirmed by a clean finer stencil: not refuted
            bad &= ~(supported & (np.abs(values - m.support_value)
                                  <= tolerance(m.support_error + value_error, m.support_value,
                                               rtol, atol)))
        at_kink = bad & m.kink & (values >= m.low) & (values <= m.high)
        if m.spread_low is not None:
            at_kink |= (bad & ~m.kink & supported & (values >= m.spread_low)
                        & (values <= m.spread_high))
        confirmed = m.tie if m.tie is not None else False
        at_tie = bad & m.kink & ~at_kink & np.isfinite(values) & tie & confirmed
    status = np.where(bad, MISMATCH, OK)
    status[at_kink] = KINK
    status[at_tie] = TIE
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.maximum.reduce([np.abs(values), np.abs(m.value), tol])
        rel = np.where(diff == 0, 0.0, diff / denom)
    return Comparison(status, diff, rel)


def second_opinion(checked: np.ndarray, autodiff: np.ndarray, m: ErrorModel, checked_error,
                   autodiff_error, rtol=None, atol=None) -> np.ndarray:
    """Per entry, whether a finer stencil's support may still pass the checked value (`compare`
    's `supported`): not where jax.grad, a separate opinion that differs from the checked value
    beyond both their rounding, agrees with the coarse estimate itself.

    The support is a second chance for a value that the coarse stencils refute, in case they
    crossed kinks unseen and are biased; its error bar is four to sixty-four times theirs in
    float32. Where jax.grad passes at the coarse stencils and the checked value does not, two
    independent sources agree against it (were the coarse estimate biased, jax.grad would have
    to be wrong by just that bias), and the wider error bar excuses nothing: one entry of a
    float32 Flax CNN's dense kernel 5% too large passed by it, where D(h), D(2h) and D(h/4)
    agreed with jax.grad within 3e-5 and the checked value lay 2.2e-3 away. Where the two
    agree (the checked gradient is jax.grad's, or right), the second chance stays: a conv bias
    feeding thousands of relu units has D(h), D(2h) and D(h/4) 2% off alike, from the kinks
    they all cross, and only h/32 comes near the derivative."""
    with np.errstate(invalid="ignore"):
        ad_passes = np.abs(autodiff - m.value) <= tolerance(m.error + autodiff_error, m.value,
                                                            rtol, atol)
    differ = apart(checked, autodiff, np.asarray(checked_error) + np.asarray(autodiff_error))
    return ~(ad_passes & differ & np.isfinite(autodiff))


def apart(a: np.ndarray, b: np.ndarray, rounding) -> np.ndarray:
    """Per entry, whether two computed gradients differ beyond their rounding bounds added
    (`rounding`, with TOL_FACTOR's room): computed, not measured, so finite differences' error
    bars do not enter. NaN on either side counts as apart."""
    with np.errstate(invalid="ignore"):
        return ~(np.abs(a - b) <= TOL_FACTOR * np.broadcast_to(rounding, np.shape(a)))


def crossing(m: ErrorModel, groups: np.ndarray | None = None) -> np.ndarray:
    """Per probe, whether its steps are known to cross kinks: its own coarse jump statistic
    lies beyond BORDERLINE_JUMP standard deviations, or its group (a leaf's entries; None:
    every probe) has a kink confirmed or a coarse jump beyond NOISE_SIGMAS (not noise, even
    over a million entries). Relu units that switch within the step at some entries of a leaf
    switch at others too, mostly unseen (`_spread`)."""
    n = len(m.value)
    if m.jump_z is None:
        return np.asarray(m.kink, bool).copy()
    with np.errstate(invalid="ignore"):
        own = m.jump_z > BORDERLINE_JUMP
        seen = m.kink | (m.jump_z > NOISE_SIGMAS)
    if groups is None:
        return own | bool(seen.any())
    ids = np.asarray(groups)
    if ids.size != n:
        raise ValueError(f"groups has {ids.size} entries for {n} probes")
    hit = np.zeros(int(ids.max(initial=-1)) + 1, bool)
    np.logical_or.at(hit, ids[seen], True)
    return own | hit[ids]
