"""The loss's measured noise: the rounding error of one evaluation, for the error bars and the step.

ECnoise (estimate.ecnoise) along one coordinate of up to MAX_NOISE_PROBES leaves, the largest
first, at exactly representable points (plan.noise_probes). The largest estimate is kept: the
noise a perturbation sees depends on how much computation the perturbed entry feeds, and the
largest is the safe choice. A probe whose values are a staircase (the loss rounds its inputs
more coarsely than the probe's spacing: float32 inside a float64 check) is repeated at a wider
spacing.
"""

from __future__ import annotations

import numpy as np

from jgc._src.report.vocab import Mode
from jgc._src.stages import differences as dq
from jgc._src.stages import plan as pl
from jgc._src.stages.split import Split

# A loss that rounds float64 inputs to float32 needs probes ~2**16 wider than float64's spacing
# (sqrt(eps64) = 1.5e-8, against float32's resolution 6e-8): two widenings by 2**8.
MAX_WIDEN = 2


def measure(ev, sp: Split, plan: pl.Plan, whole: bool = False) -> float | None:
    """The noise level (standard deviation of one evaluation), or None if unmeasurable.

    In directional mode the probes go through the programs the directions use: one per leaf,
    or with `whole` the one over all the parameters (directional.Directional.run_leaves)."""
    limit = pl.DIRECTIONAL_NOISE_PROBES if plan.mode == Mode.DIRECTIONAL else pl.MAX_NOISE_PROBES
    eps = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))
    sigmas, again = [], None
    for widen in range(MAX_WIDEN + 1):
        probes = pl.noise_probes(plan, sp, limit, widen)
        if again is not None:  # only the probes to repeat (by entry), if they are wider now
            probes = [(i, st) for i, st in probes
                      if i in again and np.max(np.abs(st)) > again[i]]
        if not probes:
            break
        values = _probe_values(ev, sp, plan, probes, whole)
        sigmas += [(x, probe, float(np.max(np.abs(v))))
                   for x, probe, v in zip((dq.ecnoise(v, eps) for v in values), probes, values)
                   if x is not None]
        # Flat or a staircase: the loss rounds its inputs more coarsely than the spacing.
        again = {i: float(np.max(np.abs(st))) for (i, st), v in zip(probes, values)
                 if dq.staircase(v)}
    for sigma, probe, scale in sorted(sigmas, key=lambda x: -x[0]):
        confirmed = _confirmed(ev, sp, plan, probe, sigma, eps * scale, whole)
        if confirmed is not None:
            return confirmed
    return None


# The finer spacing that confirms a measured noise level, as a fraction of the probe's spacing.
FINER = 2.0 ** -8
# Rounding noise keeps its level at any spacing; an estimate from 9 points varies by ~30%, so a
# finer probe's level may be this many times smaller and still confirm it.
CONFIRM = 8.0


def _confirmed(ev, sp: Split, plan: pl.Plan, probe, sigma: float, rounding: float,
               whole: bool = False) -> float | None:
    """The noise level of a probe, once a probe 256x finer along the same coordinate confirms it;
    else what the finer probe measures (None: nothing).

    ECnoise takes any variation that changes sign at the probe's spacing for noise, and a loss
    that oscillates at that scale (fresnel's integrand at |x| ~ 44, with a period of 1/|x|)
    reads as noise 1000 times its rounding; the step then grows past the oscillation, and finite
    differences average it away. Rounding noise is the same at every spacing, while any
    structure becomes smooth at a fine enough one: the finer probe must show the same level,
    within CONFIRM, or a staircase (the loss rounds its inputs: quantisation is noise too).
    A level within one unit of the loss's own rounding (`rounding`: u |f|) is taken as it is:
    it changes nothing.
    """
    i, steps = probe
    if sigma <= rounding:
        return sigma
    (fine,) = _probe_values(ev, sp, plan, [(i, steps * FINER)], whole)
    if dq.staircase(fine):
        return sigma
    level = dq.ecnoise(fine, 0.0)
    if level is not None and level * CONFIRM >= sigma:
        return sigma
    return level


def _probe_values(ev, sp: Split, plan: pl.Plan, probes, whole: bool = False
                  ) -> list[np.ndarray]:
    if plan.mode == Mode.DIRECTIONAL:
        # Through the direction batches that directional mode compiles anyway: one step
        # vector t·e_j on the device, and multiples 0, ±1, ..., of it.
        values = []
        for i, st in probes:
            k = int(np.searchsorted(sp.offsets, i, side="right")) - 1
            j = i - sp.offsets[k]
            t = float(np.max(np.abs(st)))
            if whole:
                k, j = None, i
            vec = np.zeros((1, sp.n if whole else sp.offsets[k + 1] - sp.offsets[k]))
            vec[0, j] = t
            values.append(ev.along(k, ev.vectors(vec), np.zeros(len(st), np.int64), st / t,
                                   np.full(len(st), j), np.full(len(st), j + 1)))
        return values
    index = np.concatenate([np.full(len(st), i) for i, st in probes])
    return np.split(ev.perturbed(index, np.concatenate([st for _, st in probes])),
                    len(probes))


def variation(f0: float, f_scale: float, theta: np.ndarray, leaves) -> float:
    """The scale on which the loss varies, for turning its measured noise into a relative one.

    The step rule assumes the third derivative is about the loss's own size (plan.py). A loss
    that cancels to ~0 (a sum of mixed-sign terms) still varies, on the scale of its
    first-order change |g_j| max(1, |theta_j|): the larger of the two is used, so that a
    near-zero loss does not read as noisy.
    """
    g = np.abs(np.concatenate([np.asarray(a, np.float64).ravel() for a in leaves]))
    first_order = g * np.maximum(1.0, np.abs(theta))
    finite = first_order[np.isfinite(first_order)]
    return max(abs(f0), f_scale, float(finite.max()) if finite.size else 0.0) or 1.0
