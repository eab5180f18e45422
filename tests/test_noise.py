"""The loss's measured noise (stages/noise.py): a planted rounding-like noise is measured at its
level, a smooth loss shows only its own rounding, and the scale the noise is relative to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.compat import enable_x64
from jgc._src.evaluators import factory
from jgc._src.report.vocab import Mode
from jgc._src.stages import noise
from jgc._src.stages import plan as pl
from jgc._src.stages.split import split_checked

GRID = 1e-8  # the planted noise: the loss rounded to multiples of GRID
X = np.linspace(0.3, 1.7, 12)


def smooth(x):
    return jnp.sum(jnp.tanh(x) ** 2)


def noisy(x):
    """The smooth loss rounded to multiples of GRID, as a lower precision rounds it: noise of
    standard deviation GRID / sqrt(12) (a uniform rounding error). Its gradient stays the
    smooth one (the rounding is outside autodiff)."""
    f = smooth(x)
    return f + jax.lax.stop_gradient(jnp.round(f / GRID) * GRID - f)


def measured(fn):
    with enable_x64(True):
        sp = split_checked(X)
        plan = pl.make_plan(sp, mode=Mode.FULL, x64=True, eps=None, samples=0, seed=0)
        ev = factory.make_evaluator(fn, sp, plan.theta, plan.dtypes, ())
        return noise.measure(ev, sp, plan)


def test_planted_noise_is_measured_at_its_level():
    sigma = measured(noisy)
    assert sigma is not None
    assert 0.5 < sigma / (GRID / np.sqrt(12)) < 2.0, sigma


def test_a_smooth_loss_shows_only_its_rounding():
    sigma = measured(smooth)
    u = np.finfo(np.float64).eps
    assert sigma is None or sigma < 100 * u * float(smooth(X))


def test_the_report_carries_the_measured_noise():
    with_noise = jgc.check_grad(noisy, X, mode="full")
    clean = jgc.check_grad(smooth, X, mode="full")
    assert with_noise.noise > 1e4 * clean.noise
    assert with_noise.ok, str(with_noise)  # the error bars widen with the noise: no false alarm


@pytest.mark.parametrize("f0, g, theta, expected", [
    (5.0, [3.0, -1.0], [2.0, 0.5], 6.0),  # |g| max(1, |theta|): 3 x 2
    (0.0, [np.inf, 1.0], [1.0, 1.0], 1.0),  # non-finite entries are left out
    (0.0, [0.0, 0.0], [1.0, 1.0], 1.0),  # nothing varies: 1, never 0
    (-7.0, [0.5], [0.1], 7.0),  # the loss's own size
])
def test_variation_is_the_larger_of_the_loss_and_its_first_order_change(f0, g, theta, expected):
    assert noise.variation(f0, 0.0, np.array(theta), [np.array(g)]) == expected
