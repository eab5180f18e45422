"""The user's own precision: what x64 would hide.

With x64=True a model whose parameters or data are float32 (or half precision, or complex64) is
checked in float64, where its gradient can be right while the precision it trains in is not:
`jnp.where(x < 50, jnp.exp(x), 0.)` at float32 x = 100 has a NaN gradient in float32 (the
discarded branch's inf times zero) and a finite one in float64. So whenever x64 promotes
anything, the checked gradient (and jax.grad, the third opinion) is evaluated once more at the
user's own dtypes, under the user's own x64 setting: one gradient evaluation, through the same
programs as the check's (one trace, compiled, reused by the next check).

A leaf is then reported as failing at that precision (status "precision") when the gradient
there has a non-finite entry where the float64 one is finite, or differs from the float64 one by
more than the square root of that precision's unit roundoff (about 3e-4 in float32, 9% in
bfloat16) of the gradient's largest entry: a correct computation loses a few units of roundoff
to rounding, and more than half of its digits only to an overflow, a cancellation or a branch
taken differently, which is what the user's training then sees.

The comparison presumes that both precisions compute the same function. A loss that draws
random numbers does not: `jax.random.normal(key, shape)` and `jax.random.bernoulli` turn the
same random bits into different numbers in float32 and float64, so its gradients differ for that
reason alone. Such a loss (its trace holds a `random_bits` equation, at any depth) is compared
only for non-finite entries, with a note saying why. Comparing the two losses' values instead
would not tell the draws from rounding: a loss that cancels in float32 loses all its digits
there while computing the same function.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src import compat
from jgc._src.evaluators import autodiff as ad
from jgc._src.evaluators import calls
from jgc._src.evaluators.factory import make_evaluator
from jgc._src.report.report import LeafReport
from jgc._src.report.vocab import Status
from jgc._src.stages import differences as dq
from jgc._src.stages.split import InputError, match_gradient


@dataclasses.dataclass(frozen=True)
class Own:
    """The gradients at the user's own precision, per checked leaf (real views), or None where
    they could not be computed."""

    dtype: str  # the coarsest of the checked leaves' own dtypes, for the words
    checked: tuple[np.ndarray, ...] | None
    autodiff: tuple[np.ndarray, ...] | None
    why: str | None = None  # why the checked gradient could not be evaluated there
    draws: bool = False  # the loss draws random numbers: values not comparable (module doc)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One leaf's gradient at the user's precision, against the float64 one."""

    dtype: str
    n_bad: int  # entries off: non-finite, or beyond the precision's resolution
    n_nonfinite: int
    worst_index: tuple[int, ...]
    value64: float
    value_own: float
    error: float  # the largest deviation relative to the gradient's scale (inf: non-finite)
    threshold: float
    autodiff_too: bool | None  # jax.grad shows the same at that precision (None: unknown)


def own_dtypes(check) -> list[np.dtype]:
    """Each checked leaf's real dtype as the user's model runs it: its own dtype, as JAX holds
    it under the user's x64 setting."""
    out = []
    with compat.enable_x64(check.precision.user):
        for spec in check.sp.checked_specs():
            dt = np.dtype(spec.dtype)
            if np.issubdtype(dt, np.complexfloating):
                dt = np.finfo(dt).dtype
            out.append(np.dtype(jax.dtypes.canonicalize_dtype(dt)))
    return out


def evaluate(check, grad, what: str) -> Own | None:
    """The checked gradient and jax.grad at the user's own dtypes, or None when x64 promoted
    nothing (or the gradient is a ready pytree, already at the precision it was computed in).

    Runs under the user's x64 setting, with the user's own arguments (unpromoted)."""
    if not check.promoted or (grad is not None and not calls.is_function(grad)):
        return None
    dtypes = own_dtypes(check)
    coarsest = max(dtypes, key=lambda d: jnp.finfo(d).eps)
    subject, sp = check.subject, check.sp

    def run():
        try:  # the loss at the user's dtypes, under the user's promotion settings, may fail
            ev = make_evaluator(subject.fn, sp, check.plan.theta, dtypes, subject.args,
                                has_aux=subject.has_aux, name=subject.fn_name)
        except InputError as e:
            return Own(str(coarsest), None, None, str(e).splitlines()[0])
        draws = _draws(ev)
        autodiff, why, _ = ad.autodiff(ev) if ev.traceable else (None, None, None)
        autodiff = None if autodiff is None else _leaves(sp, autodiff)
        if grad is None:
            return Own(str(coarsest), autodiff, None, why, draws)
        try:
            call = calls.call_gradient(ev, grad, what)
            out = calls.without_aux(call.out, sp, subject.params, subject.has_aux)
            checked = tuple(match_gradient(out, sp, subject.params, what))
        except InputError as e:
            return Own(str(coarsest), None, autodiff, str(e).splitlines()[0], draws)
        return Own(str(coarsest), checked, autodiff, None, draws)

    return check.precision.run(run, own=True)


def _draws(ev) -> bool:
    """Whether the traced loss draws random numbers (a `random_bits` equation, nested ones
    included). A NumPy loss is not traced: its hidden randomness has its own verdict."""
    traced = getattr(ev, "traced", None)
    return traced is not None and any(
        eqn.primitive.name == "random_bits" for eqn in ad.walk(traced.closed.jaxpr))


def _leaves(sp, flat: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(flat[sp.offsets[k]:sp.offsets[k + 1]].reshape(sp.specs[i].view_shape)
                 for k, i in enumerate(sp.checked))


def resolution(dtype) -> float:
    """The deviation from float64, relative to the gradient's scale, beyond which a gradient
    computed in `dtype` has lost more than half its digits (see the module doc)."""
    return math.sqrt(float(jnp.finfo(dtype).eps))


def findings(own: Own | None, reference: tuple[np.ndarray, ...],
             reference_ad: tuple[np.ndarray, ...] | None, dtypes, thetas,
             loss_size: float) -> dict[int, Finding]:
    """Per checked leaf k with a finding: the checked gradient at the user's precision against
    the float64 one (`reference`), on the scale of the whole float64 gradient. A difference
    too small to change the loss at that precision (|dg| max(1, |theta|) within KAPPA u |f|,
    `loss_size` = |f|) is none: erf'(10) = 4e-45 is 0 in float32, and rightly so. A loss that draws
    random numbers is compared for non-finite entries only (see the module doc)."""
    if own is None or own.checked is None:
        return {}
    values = not own.draws
    scale = _scale(reference) if values else 0.0
    out = {}
    for k, (g64, g) in enumerate(zip(reference, own.checked)):
        floor = dq.KAPPA * float(jnp.finfo(dtypes[k]).eps) * loss_size / np.maximum(
            1.0, np.abs(thetas[k]))
        found = _compare(np.asarray(g64, np.float64), np.asarray(g, np.float64), scale,
                         dtypes[k], floor)
        if found is None:
            continue
        autodiff_too = None
        if own.autodiff is not None and reference_ad is not None:
            autodiff_too = _compare(np.asarray(reference_ad[k], np.float64),
                                    np.asarray(own.autodiff[k], np.float64),
                                    _scale(reference_ad) if values else 0.0, dtypes[k],
                                    floor) is not None
        out[k] = dataclasses.replace(found, autodiff_too=autodiff_too)
    return out


def _scale(leaves) -> float:
    finite = [np.abs(a[np.isfinite(a)]) for a in (np.asarray(x, np.float64) for x in leaves)]
    return max((float(a.max()) for a in finite if a.size), default=0.0)


def _compare(g64: np.ndarray, g: np.ndarray, scale: float, dtype, floor) -> Finding | None:
    threshold = resolution(dtype)
    nonfinite = ~np.isfinite(g) & np.isfinite(g64)
    floor = np.broadcast_to(np.reshape(floor, g.shape) if np.size(floor) == g.size else floor,
                            g.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        dev = np.where(nonfinite, np.inf, np.abs(g - g64) / scale if scale > 0 else 0.0)
        dev = np.where(nonfinite | (np.abs(g - g64) > floor), dev, 0.0)
    dev = np.where(np.isfinite(g64), dev, 0.0)  # float64 itself not finite: judged there
    bad = dev > threshold
    if not bad.any():
        return None
    j = int(np.argmax(dev))
    index = tuple(int(i) for i in np.unravel_index(j, g.shape))
    return Finding(str(dtype), int(bad.sum()), int(nonfinite.sum()), index,
                   float(g64.ravel()[j]), float(g.ravel()[j]), float(dev.ravel()[j]), threshold,
                   None)


def merge(report: LeafReport, finding: Finding | None) -> LeafReport:
    """A leaf verified in float64 whose gradient fails at the user's precision is reported as
    failing there (status "precision"), with where and by how much; a mismatch stays one."""
    if finding is None:
        return report
    changes = dict(own_dtype=finding.dtype, own_n_bad=finding.n_bad,
                   own_n_nonfinite=finding.n_nonfinite,
                   own_worst=(finding.worst_index, finding.value64, finding.value_own),
                   own_autodiff_too=finding.autodiff_too)
    if report.status in (Status.OK, Status.KINK, Status.UNRESOLVED):
        changes["status"] = Status.PRECISION
    return dataclasses.replace(report, **changes)
