"""method="complex": the complex step Im f(x + i h e_k) / h, after checking analyticity.

The complex step has no subtractive cancellation: with h = u·max(1, |x|) its truncation (h**2
times the third derivative, over 6) is below rounding, and it is exact to rounding for a
complex-analytic loss. For anything else (abs, max, relu, comparisons, .real, float(), NumPy
code) its "derivative" is meaningless, silently zero for abs or .real: jgc first compares it
with central differences on a sample and refuses such a loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jgc._src.report.vocab import Method
from jgc._src.stages import differences as dq
from jgc._src.stages import errormodel as em
from jgc._src.stages import plan as pl
from jgc._src.stages.perturbations import Coordinates, all_steps, global_indices
from jgc._src.stages.split import InputError, Split, listing


def refuse_complex_leaves(sp: Split) -> None:
    """The complex step perturbs along the imaginary axis, which a complex parameter already
    uses: Im f(z + ih) / h would mix its derivative along Im z into the result."""
    bad = sp.complex_paths()
    if bad:
        raise InputError(
            f"method='complex' (the complex step) cannot check complex parameters "
            f"({listing(bad, 5)}): it needs the imaginary "
            "axis for its own step, which a complex parameter already uses. Use "
            "method='central' (the default) or 'richardson': they perturb the real and the "
            "imaginary part of each entry separately.")


def values(ev, sp: Split, plan: pl.Plan, f0: float, sigma, u: float, float64: bool,
           f_scale: float, seed: int) -> np.ndarray:
    """The complex step at every planned entry, after verifying analyticity on a sample.

    Raises InputError when the loss is not traceable, cannot take complex parameters, or is not
    analytic.
    """
    if not ev.traceable:
        raise InputError("method='complex' needs a loss JAX can trace (it evaluates it at "
                         "complex parameters); this one is not traceable. Use "
                         "method='central'.")
    index = global_indices(sp, plan)
    hp, _ = all_steps(sp, plan, 1.0)
    value = ev.complex_step(index, hp)
    # Analyticity: compare with central differences (and their error bars) on a sample.
    # Up to two of each leaf's planned entries (a sample of a sample in mode="sample"), where
    # the complex step was taken.
    rng = np.random.default_rng(seed)
    sample = dataclasses.replace(plan, entries=tuple(
        np.sort(rng.choice(e, size=min(2, len(e)), replace=False)) for e in plan.entries),
        method=Method.CENTRAL)
    probes = Coordinates(ev, sp, sample)
    everywhere = np.ones(len(probes.index), bool)
    d = dq.differences(f0, len(probes.index), sigma, u, float64, f_scale)
    for s in (0, 1):
        v = probes.evaluate(s, everywhere)
        d = dq.with_stencil(d, s, everywhere, v.fp, v.fm, v.hp, v.hm)
    central = em.error_model(d)
    pos = {int(i): j for j, i in enumerate(index)}
    cs = value[[pos[int(i)] for i in probes.index]]
    cs_err = em.rounding(cs, u, float(np.max(np.abs(cs))) if cs.size else 0.0)
    off = np.abs(cs - central.value) > dq.TOL_FACTOR * (central.error + cs_err)
    if off.any():
        j = int(np.argmax(off))
        raise InputError(
            f"method='complex' needs a complex-analytic loss, but at "
            f"{sp.locate(probes.index[j])} the complex step gives {cs[j]:.6g} where central "
            f"differences give {central.value[j]:.6g}: the loss is not analytic (abs, max, "
            "relu, comparisons, or code that drops the imaginary part, such as .real, float() "
            "or NumPy). Use method='central', or method='richardson' for more digits.")
    return value


def model(ev, sp: Split, plan: pl.Plan, f0: float, sigma, u: float, float64: bool,
          f_scale: float, seed: int) -> em.ErrorModel:
    """The complex step as an error model: its error bar is the rounding of the derivative
    itself, bounded like a gradient's (estimate.rounding, on the leaf's scale)."""
    value = values(ev, sp, plan, f0, sigma, u, float64, f_scale, seed)
    scale = np.concatenate([np.full(len(e), float(np.max(np.abs(value[a:a + len(e)])))
                                    if len(e) else 0.0)
                            for a, e in zip(np.cumsum([0] + [len(e) for e in plan.entries]),
                                            plan.entries)]) if len(value) else np.zeros(0)
    error = em.rounding(value, u, scale)
    nan = np.full(len(value), np.nan)
    return em.ErrorModel(value, error, np.zeros(len(value), bool), nan, nan, value,
                         error / dq.NOISE_SIGMAS, np.ones(len(value), bool),
                         slope_low=value - dq.TOL_FACTOR * error,
                         slope_high=value + dq.TOL_FACTOR * error, rounding=error)
