"""Stage `plan` on its own: exact steps that balance rounding against truncation, and the seeded
samples of entries."""

import math

import numpy as np
import pytest

from jgc._src.report.vocab import Method, Mode
from jgc._src.stages import plan as pl
from jgc._src.stages.split import split_checked


def _plan(params, method=Method.CENTRAL, eps=None, mode=Mode.FULL, x64=True):
    sp = split_checked(params)
    return sp, pl.make_plan(sp, mode=mode, x64=x64, eps=eps, samples=4, seed=0, method=method)


@pytest.mark.parametrize("x64", [True, False])
def test_steps_are_exact_and_balance_rounding_against_truncation(x64):
    p = {"w": np.array([0.0, 1e-3, 0.37, -5.0, 1234.5, 3e7])}
    sp, plan = _plan(p, x64=x64)
    dt = plan.dtypes[0]
    x = p["w"].astype(dt)
    hp, hm = pl.steps(plan, sp, 0)
    assert np.array_equal(((x + hp.astype(dt)) - x).astype(np.float64), hp)  # representable
    assert np.array_equal((x - (x - hm.astype(dt))).astype(np.float64), hm)
    u = pl.machine_eps(dt)
    nominal = u ** (1 / 3) * np.maximum(1.0, np.abs(x.astype(np.float64)))
    assert np.all((hp > nominal / 2) & (hp < nominal * 2))
    _, rich = _plan(p, method=Method.RICHARDSON, x64=x64)
    assert pl.nominal_step(rich, 0) == pytest.approx(u ** (1 / 5))
    _, fixed = _plan(p, eps=1e-4, x64=x64)
    assert pl.nominal_step(fixed, 0) == 1e-4 and "fixed" in fixed.step_rule


def test_step_follows_a_measured_noise_above_rounding():
    sp, plan = _plan({"w": np.ones(3)})
    noisy = pl.with_noise(plan, 1e-8)
    assert pl.nominal_step(noisy, 0) == pytest.approx(1e-8 ** (1 / 3))
    assert "measured noise" in noisy.step_rule
    assert pl.nominal_step(pl.with_noise(plan, 1e-20), 0) == pl.nominal_step(plan, 0)


def test_tangent_step_is_a_power_of_two():
    sp, plan = _plan({"w": np.linspace(-3, 3, 10)})
    h = pl.tangent_step(plan, np.random.default_rng(0).standard_normal(10))
    assert h > 0 and math.log2(h) == int(math.log2(h))


def test_samples_are_seeded_by_path_and_include_the_largest_entries():
    p = {"a": np.zeros(100), "b": np.zeros(100)}
    sp = split_checked(p)
    first = pl.sample_entries(sp, 8, seed=0)
    again = pl.sample_entries(split_checked({**p, "c": np.zeros(50)}), 8, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(first, again[:2]))
    big = np.zeros(100)
    big[[3, 97]] = 5.0
    with_top = pl.sample_entries(sp, 8, seed=0, magnitudes=[big, big])
    assert {3, 97} <= set(with_top[0]) and len(with_top[0]) == 8


def test_largest_entries_match_a_stable_argsort():
    """plan._largest (a partition, O(n)) picks the same entries as the stable argsort it
    replaced, ties to the lower index; so samples did not move."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        size = rng.integers(0, 4, n).astype(float)  # many ties
        for k in (0, 1, int(rng.integers(0, n + 1)), n, n + 3):
            want = set(np.argsort(-size, kind="stable")[:k].tolist())
            assert set(pl._largest(size, k).tolist()) == want
