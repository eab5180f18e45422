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
