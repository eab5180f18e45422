"""Stage `estimate` on its own: the error model, the kink statistic and the stencil schedule
(stages/differences.py, errormodel.py, estimate.py), on scalar functions with known derivatives."""

import numpy as np
import pytest

from jgc._src.report.vocab import Entry, Method
from jgc._src.stages import differences as dq
from jgc._src.stages import estimate as es

U64 = float(np.finfo(np.float64).eps)


def derivative_of(f, x, checked, h=None, groups=None, sigma=None, **schedule):
    """The stencil schedule on a scalar function f at the points x (one probe each), with
    exact steps: what check_grad does for one entry per probe."""
    x = np.asarray(x, np.float64)
    h = U64 ** (1 / 3) * np.maximum(1.0, np.abs(x)) if h is None else np.full(len(x), h)

    def evaluate(s, where):
        step = dq.SCALES[s] * h[where]
        hp, hm = (x[where] + step) - x[where], x[where] - (x[where] - step)
        return es.Sides(f(x[where] + hp), f(x[where] - hm), hp, hm, f0=f(x[where]))

    d = dq.differences(0.0, len(x), sigma, U64, True, f_scale=float(np.max(np.abs(f(x)))))
    return es.derivative(evaluate, d, np.asarray(checked, np.float64), 0.0,
                         schedule=es.Schedule(**schedule), groups=groups)


def test_error_bar_contains_the_true_derivative_and_is_tight_on_a_smooth_function():
    x = np.linspace(-2.0, 2.0, 9)
    found = derivative_of(np.sin, x, np.cos(x))
    m = found.model
    assert not m.kink.any()
    assert np.all(np.abs(m.value - np.cos(x)) <= m.error)
    # float64, h = u**(1/3): about 10 correct digits, and the bar says so (not 1e-3).
    assert np.all(m.error < 1e-7) and np.all(found.cmp.status == Entry.OK)


def test_a_wrong_value_is_a_mismatch_and_a_right_one_is_not():
    x = np.array([0.3, 1.1])
    found = derivative_of(np.exp, x, np.exp(x) * np.array([1.0, 1.001]))
    assert list(found.cmp.status) == [Entry.OK, Entry.MISMATCH]


def test_kink_statistic_flags_abs_at_zero_and_accepts_values_between_the_slopes():
    """|x| at 0: the one-sided slopes are -1 and 1 at every step, so their jump does not shrink
    with the step (a smooth loss's does, linearly): a kink. 0 is the central difference
    itself: it agrees within rounding, so (float64) no 2h stencil is taken there and it is ok
    as is; any other value in [-1, 1] passes as a kink, and one outside is a mismatch."""
    x = np.zeros(3)
    found = derivative_of(np.abs, x, np.array([0.0, 0.7, 1.5]))
    assert found.model.kink[1:].all()
    assert found.model.low[1] == pytest.approx(-1) and found.model.high[1] == pytest.approx(1)
    assert list(found.cmp.status) == [Entry.OK, Entry.KINK, Entry.MISMATCH]


def test_refinement_clears_a_kink_the_first_stencil_merely_crossed():
    """A kink at h/2 from x: the h and 2h stencils cross it, h/4 does not. The schedule
    refines and judges at the finest smooth level, so the true slope passes, cleanly. (A kink
    at 3h/2 is crossed by 2h only: D(h) is exact there and nothing needs refining.)"""
    h = 1e-3
    kink_at = 0.5 * h
    f = lambda x: np.maximum(x - kink_at, 0.0) * 10.0 + x
    found = derivative_of(f, np.zeros(1), np.ones(1), h=h)
    assert found.cmp.status[0] == Entry.OK
    no_refine = derivative_of(f, np.zeros(1), np.ones(1), h=h, refine=False)
    assert no_refine.cmp.status[0] != Entry.OK  # the positive control: h alone is fooled


def test_ecnoise_measures_known_noise_and_refuses_a_kink():
    rng = np.random.default_rng(0)
    t = np.arange(9.0) * 1e-4
    noisy = 1.0 + 0.5 * t + rng.normal(scale=1e-10, size=9)
    assert dq.ecnoise(noisy, U64) == pytest.approx(1e-10, rel=0.7)
    assert dq.ecnoise(np.abs(t - 4.5e-4), U64) is None


def test_richardson_values_are_more_accurate_than_central_on_a_curved_function():
    x = np.array([0.7])
    f = lambda t: np.exp(3 * t)
    exact = 3 * np.exp(2.1)
    h = np.full(1, 1e-2)  # a large step, so truncation dominates

    def evaluate(s, where):
        step = dq.SCALES[s] * h
        return es.Sides(f(x + step), f(x - step), step, step, f0=f(x))

    central = es.values(evaluate, dq.differences(0.0, 1, None, U64, True))
    rich = es.values(evaluate, dq.differences(0.0, 1, None, U64, True), Method.RICHARDSON)
    assert abs(rich[0] - exact) < abs(central[0] - exact) / 100


def _kinks_the_statistic_misses(x, h):
    """x plus three relu kinks placed so that neither the jump statistic nor the truncation
    estimate sees them at the coarse stencils h and 2h: one at e h right of 0 (jump 1), one at
    1.5h (jump 2 - 4e) and one at -1.5h (jump 2 - 2e), e = 1/1024 (every number exact in
    binary). Then D(h) = D(2h) = 1.5 - e/2 while f'(0) = 1, and J(2h) = 2 J(h): it reads as
    smooth curvature. The derivative still lies between the one-sided slopes at h (1 and
    2 - e) and at 2h, as it does wherever the slope jumps share a sign."""
    e = 1 / 1024
    return (x + np.maximum(x - e * h, 0.0) + (2 - 4 * e) * np.maximum(x - 1.5 * h, 0.0)
            + (2 - 2 * e) * np.maximum(-x - 1.5 * h, 0.0))


def test_kinks_crossed_unseen_excuse_a_value_between_every_stencils_slopes_where_kinks_are_seen():
    """Where the steps are known to cross kinks (errormodel.crossing: a kink seen in the same
    group), a value the central differences refute but that lies between the one-sided slopes
    of every stencil the estimate rests on is accepted as at a kink: kinks crossed unseen bias
    every central difference by up to half that range, and the derivative lies in it. Without
    that evidence, or outside the slopes, it stays a mismatch."""
    h = 2.0 ** -10
    f = lambda x: np.where(x < 0.5, _kinks_the_statistic_misses(x, h),  # noqa: E731
                           np.abs(x - 1.0))
    x = np.array([0.0, 0.0, 0.0, 1.0])  # three probes of the kinky side, one at |x - 1|'s kink
    checked = np.array([1.0, 1.0, 0.9, 0.2])  # the derivative, twice; one below the slopes
    # The coarse stencils only (refinement would clear the first kink, which sits within h/4).
    seen = derivative_of(f, x, checked, h=h, groups=np.array([0, 1, 0, 0]), refine=False)
    assert seen.model.kink[3] and not seen.model.kink[:3].any()
    assert seen.model.value[0] == pytest.approx(1.5, abs=1e-3)  # refutes 1 and 0.9 alike
    assert seen.cmp.status[0] == Entry.KINK  # its group has a kink: the slopes excuse it
    assert seen.cmp.status[1] == Entry.MISMATCH  # its own group has none: no excuse
    assert seen.cmp.status[2] == Entry.MISMATCH  # below the slopes: not the derivative
    assert seen.model.spread_low[0] <= 1.0 <= seen.model.spread_high[0]
    assert np.isnan(seen.model.spread_low[1])
