"""Stage `compare` (stages/compare.py): the classic single number, a gradient's own rounding as
part of its error bar, and the planned entries it compares."""

import math

import numpy as np
import pytest

from jgc._src.report.vocab import Mode
from jgc._src.stages import compare as cp
from jgc._src.stages import plan as pl
from jgc._src.stages.split import split_checked


def test_global_rel_error_is_the_classic_number():
    g, n = np.array([3.0, 0.0]), np.array([0.0, 4.0])
    assert cp.global_rel_error(g, n) == pytest.approx(5.0 / 7.0)
    assert cp.global_rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert cp.global_rel_error(np.zeros(3), np.zeros(3)) == 0.0  # nothing to compare: no 0/0
    assert cp.global_rel_error(np.array([np.inf, 1.0]), np.ones(2)) == math.inf


def test_a_gradient_carries_the_rounding_of_its_own_dtype():
    g32 = np.array([1.0, -3.0, 1e-6], np.float32)
    g64 = g32.astype(np.float64)
    r32, r64 = cp.leaf_rounding(g32), cp.leaf_rounding(g64)
    assert np.all(r32 > 1e6 * r64)  # float32's rounding, on the leaf's largest entry's scale
    assert r32[2] == pytest.approx(r32[1])  # a small entry is bounded on the leaf's scale
    nonfinite = cp.leaf_rounding(np.array([np.nan, 2.0, np.inf]))
    assert nonfinite[0] == nonfinite[2] == 0.0 and np.isfinite(nonfinite[1])
    assert np.all(cp.leaf_rounding(np.array([1, 2, 3])) == 0.0)  # integers: exact


def test_only_the_planned_entries_are_compared():
    params = {"a": np.arange(6.0).reshape(2, 3), "b": np.array([10.0, 20.0])}
    sp = split_checked(params)
    plan = pl.make_plan(sp, mode=Mode.SAMPLE, x64=True, eps=None, samples=2, seed=3)
    got = cp.restricted(plan, [params["a"], params["b"]])
    want = np.concatenate([params["a"].ravel()[plan.entries[0]], params["b"][plan.entries[1]]])
    assert got.tolist() == want.tolist() and len(got) == 4


def test_resolution_counts_each_entry_at_most_its_capped_term():
    """The leaf-level statistic caps each entry's term at NOISE_SIGMAS**2, so one large entry
    cannot resolve alone what its cap denies it: the resolution comes from the others."""
    from jgc._src.stages import patterns as pt

    sd = np.full(4, 0.1)
    even = np.ones(4)  # no entry reaches the cap: e**2 sum((v / sd)**2) = room
    assert pt.resolution(even, sd, 50.0) == pytest.approx(math.sqrt(46 / 400))
    # One entry 100x larger: it gives at most 36, the other three must give the rest (10).
    lopsided = np.array([100.0, 1.0, 1.0, 1.0])
    assert pt.resolution(lopsided, sd, 50.0) == pytest.approx(math.sqrt(10 / 300))
    # Where every entry at its cap cannot reach the threshold, nothing is resolved.
    assert pt.resolution(np.array([100.0]), np.array([0.1]), 50.0) == math.inf


def test_resolution_widens_entries_with_a_borderline_jump():
    """An entry taken as smooth (jump statistic below NOISE_SIGMAS) whose statistic exceeds
    BORDERLINE_JUMP may hide a kink: its resolution is widened by the statistic, and the
    leaf-level test keeps it (only flagged kinks leave); an entry at a flagged kink keeps its
    own width (the slopes' range)."""
    from jgc._src.stages import errormodel as em

    n = 4
    z = np.array([0.5, 4.0, 8.0, np.nan])  # smooth, borderline, a kink, no 2h stencil
    kink = np.array([False, False, True, False])
    ones = np.ones(n)
    model = em.ErrorModel(ones, ones * 0.01, kink, ones, ones, ones, ones * 0.001,
                          np.ones(n, bool), jump_z=z, jump_stat=z * 0.01)
    c = cp.collective(model, slice(None), ones * 1.001, 0.0)
    assert list(c.where) == [0, 1, 3]
    compared = cp.Compared(model, None, None, ones, 0.0, None, 0.0, ones * 0.03, ones * 0.02,
                           None)
    width = cp._resolving_width(model, slice(None), compared)
    # Off a kink, the width a value may pass with plus the numerical derivative's own error
    # bar (0.01): the error a bug needs to be caught for sure; plus the statistic (0.04) on the
    # borderline entry. At the kink, the width alone.
    assert list(width) == pytest.approx([0.03, 0.07, 0.02, 0.03])
