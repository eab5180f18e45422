"""The bug patterns (stages/patterns.py) fitted one by one, and the triage that names who is wrong
(stages/diagnose.py)."""

import numpy as np
import pytest

from jgc._src.report.report import LeafReport
from jgc._src.report.vocab import Pattern, Status, Verdict
from jgc._src.stages import patterns as pt
from jgc._src.stages.diagnose import triage
from jgc._src.stages.patterns import Collective, find_pattern

RNG = np.random.default_rng(7)
D = RNG.normal(size=(4, 4))
D = D + 0.5 * np.eye(4) + np.triu(D, 1)  # not symmetric
THETA = RNG.normal(size=16)
TOL = np.full(16, 1e-9)


@pytest.mark.parametrize("g, expected", [
    (3.0 * D.ravel(), (Pattern.SCALE, 3.0)),
    (-D.ravel(), (Pattern.SIGN, -1.0)),
    (D.T.ravel(), (Pattern.TRANSPOSE, None)),
    (D.ravel() + 0.1 * THETA, (Pattern.REGULARIZATION, 0.1)),
    (np.zeros(16), (Pattern.ZERO, 0.0)),
    (D.ravel() + RNG.normal(size=16), (None, None)),
    (D.ravel(), (None, None)),
], ids=["scale", "sign", "transpose", "regularization", "zero", "no pattern", "no bug"])
def test_each_pattern_is_fitted(g, expected):
    pattern, factor = find_pattern(g, D.ravel(), THETA, TOL, (4, 4), full=True)
    assert pattern == expected[0]
    if expected[1] is not None:
        assert factor == pytest.approx(expected[1])


def test_patterns_skip_entries_at_kinks():
    g = 2.0 * D.ravel()
    d = D.ravel().copy()
    d[:3] = 40.0  # central differences across kinks: no derivative
    smooth = np.ones(16, bool)
    smooth[:3] = False
    assert find_pattern(g, d, THETA, TOL, (4, 4), True, smooth)[0] == Pattern.SCALE
    assert find_pattern(g, d, THETA, TOL, (4, 4), True)[0] != Pattern.SCALE


def test_the_leaf_level_fit_needs_a_systematic_pattern():
    ref = RNG.normal(size=64)
    sd = np.full(64, 1e-3)
    for g, expected in ((ref * 1.01, Pattern.SCALE), (ref + 0.02 * RNG.normal(size=64), None)):
        c = Collective(ref, sd, pt.chi2(g - ref, sd), pt.chi2_threshold(64), np.arange(64))
        assert c.significant and c.fit(g, np.zeros(64))[0] == expected


# A float32 Flax MNIST CNN's second conv kernel, sampled (seed 2): the Richardson references and
# jax.grad's correct values. Steps of 0.5% cross relu kinks, which leave residuals the noise
# (sd) does not explain, each its own way; the three largest entries happened to lean alike.
CONV_REF = np.array([1.9417803528386894e-03, 3.3103182154764179e-04, 0.0, 1.6410272966061984e-02,
                     2.4302556345553606e-03, 5.5306482944182081e-04, 0.0, 5.6517549365906622e-05,
                     -1.5340471180739015e-04, -1.3281629845719638e-03, 1.3788269525244809e-01,
                     1.3500029898805788e-01, 0.0, 0.0])
CONV_GRAD = np.array([1.9955681636929512e-03, 2.0791764836758375e-04, 0.0,
                      1.6520347446203232e-02, 2.4204985238611698e-03, 5.7305191876366735e-04,
                      0.0, 5.2135190344415605e-05, -1.2933912512380630e-04,
                      -1.3367286883294582e-03, 1.3806107640266418e-01, 1.3505181670188904e-01,
                      0.0, 0.0])


@pytest.mark.parametrize("factor, expected", [(1.0, None), (1.01, Pattern.SCALE)])
def test_a_leaf_level_pattern_must_stand_out_of_the_scatter_it_leaves(factor, expected):
    """The correct gradient's residuals exceed the noise (chi2 78.1 over 14 entries) and a factor
    1.0009 through the largest entries halves them, but leaves 44.7 where 13 are expected: that
    scatter, not the noise, is what a factor must stand out of, and this one does not. A 1%
    factor on the same entries does."""
    sd = np.full(len(CONV_REF), 2.8409441192965237e-05)
    g = CONV_GRAD * factor
    c = Collective(CONV_REF, sd, pt.chi2(g - CONV_REF, sd), pt.chi2_threshold(len(sd)),
                   np.arange(len(sd)))
    assert c.significant
    assert c.fit(g, np.zeros(len(sd)))[0] == expected


def _leaf(path, status, autodiff_status=None):
    return LeafReport(path, (2,), "float64", 2, status, autodiff_status=autodiff_status)


def test_triage_names_who_is_wrong():
    ok = _leaf("a", Status.OK, Status.OK)
    wrong = _leaf("b", Status.MISMATCH, Status.OK)
    numerics = _leaf("c", Status.MISMATCH, Status.MISMATCH)
    assert triage([ok], {}, False).verdict == Verdict.OK
    assert triage([ok, _leaf("u", Status.UNRESOLVED)], {}, False).verdict == Verdict.UNRESOLVED
    t = triage([ok, wrong], {"b": False}, False)
    assert t.verdict == Verdict.WRONG_GRADIENT and t.wrong == [wrong]
    assert triage([numerics], {"c": True}, False).verdict == Verdict.SUSPECT_NUMERICS
    assert triage([numerics], {"c": False}, False).verdict == Verdict.DISAGREEMENT
    assert triage([numerics], {"c": True}, True).verdict == Verdict.WRONG_GRADIENT


def test_one_wrong_entry_of_a_large_leaf_is_no_factor():
    """Taken together, the error bars of a large leaf outweighed one wrong entry: one entry of
    a 802,816-entry kernel 5% off was explained as the whole leaf 0.029% too large."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=100_000)
    tol = np.full(d.size, 1e-3)
    g = d + rng.uniform(-0.5, 0.5, d.size) * 1e-3  # every entry within its error bar
    j = int(np.argmax(np.abs(d)))
    g[j] = d[j] * 1.05
    pattern, _ = find_pattern(g, d, np.ones(d.size), tol, d.shape, False)
    assert pattern is None
    twice = d * 2 + rng.uniform(-0.5, 0.5, d.size) * 1e-3  # a real factor is still one
    assert find_pattern(twice, d, np.ones(d.size), tol, d.shape, False)[0] == "scale"


@pytest.mark.parametrize("factor, expected", [(1.0, None), (0.98, Pattern.SCALE),
                                              (1.02, Pattern.SCALE)])
def test_a_leaf_level_factor_must_not_drift_with_the_step(factor, expected):
    """Kinks crossed by the steps scatter the residuals and bias every difference quotient of
    a leaf alike, by about as much as the step: D(h) 0.4% high and D(2h) 0.8% (as on a float32
    Flax CNN's conv kernel) make the Richardson reference look like a factor 1/1.0027 on a
    correct gradient. That factor drifts when the bias linear in the step is removed, and is
    no finding; a real one stays."""
    rng = np.random.default_rng(3)
    n, bias = 400, 0.004
    true = rng.normal(size=n)
    sd = np.full(n, 2e-3)
    d1 = true * (1 + bias) + 3 * sd * rng.normal(size=n) + sd * rng.normal(size=n)
    d2 = true * (1 + 2 * bias) + 3 * sd * rng.normal(size=n) + sd / 2 * rng.normal(size=n)
    reference, debiased = (4 * d1 - d2) / 3, 2 * d1 - d2
    g = true * factor
    c = Collective(reference, sd, pt.chi2(g - reference, sd), pt.chi2_threshold(n),
                   np.arange(n), debiased=debiased)
    assert c.significant
    name, fitted = c.fit(g, np.zeros(n))
    assert name == expected
    if expected is not None:
        assert fitted == pytest.approx(factor, abs=0.005)
    assert c.resolution(g, np.zeros(n)) < 0.02  # what the leaf can still tell


def test_two_entries_claim_only_what_each_shows():
    """A leaf-level pattern on fewer than MIN_FIT entries needs each entry to show it by
    EACH_SIGMAS noises: the resolution claims no finer than that (a float32 conv bias of two
    entries claimed the chi-squared 0.46%, and a 1% factor showed 0.8 noises at one entry and
    passed)."""
    ref = np.array([-0.02391501, -0.00606353])
    sd = np.full(2, 2.46033581e-05)
    g = np.array([-0.02411842, -0.00608211])  # 1% too large, after the noise
    c = Collective(ref, sd, pt.chi2(g - ref, sd), pt.chi2_threshold(2), np.arange(2))
    assert c.significant and c.fit(g, np.zeros(2))[0] is None
    assert c.resolution() > 0.01 and c.resolution(g, np.zeros(2)) > 0.01


def _sampled_relu_lstm_leaf(crossed: bool, kinks: int):
    """The recorded leaf-level numbers of a float32 relu LSTM's weight, sampled (8 entries):
    two large entries each 5% off a jax.grad that float64 confirms (kinks the steps crossed
    unseen), the others too small to resolve 5%."""
    g = np.array([-0.5669, 0.22367, -1559.5, -70.084, 0.28795, -105.18, 1401.1, 0.0094309])
    ref = np.array([-0.28627, 0.22323, -1483.3, -80.729, 0.28885, -103.01, 1333.3,
                    0.0087844])
    debiased = np.array([-0.13952, 0.22323, -1480.7, -96.642, 0.28989, -102.36, 1335.0,
                         0.007751])
    sd = np.full(8, 5.69)
    return g, Collective(ref, sd, pt.chi2(g - ref, sd), pt.chi2_threshold(8), np.arange(8),
                         debiased=debiased, crossed=crossed, kinks=kinks)


def test_where_the_steps_cross_kinks_two_entries_do_not_make_a_factor():
    """In a leaf whose steps cross kinks, a pattern must be shown by more entries than the
    kinks found there (Collective._shown_widely): two entries biased alike by kinks crossed
    unseen fitted a factor 1.05 that stood out of the scatter of the rest. Where no kink was
    seen, the same numbers still name the factor (the plain leaf-level test)."""
    g, crossed = _sampled_relu_lstm_leaf(crossed=True, kinks=4)
    assert crossed.significant and crossed.fit(g, np.zeros(8)) == (None, None)
    assert crossed.resolution(g, np.zeros(8)) > 0.05  # it does not claim to see 5%
    g, plain = _sampled_relu_lstm_leaf(crossed=False, kinks=0)
    assert plain.fit(g, np.zeros(8))[0] == Pattern.SCALE


@pytest.mark.parametrize("factor, expected", [(1.0, None), (1.02, Pattern.SCALE),
                                              (0.98, Pattern.SCALE)])
def test_where_the_steps_cross_kinks_a_factor_of_the_whole_leaf_is_still_named(factor,
                                                                                 expected):
    """A factor of the whole leaf shows at every entry that resolves it, far more entries
    than kinks were found: crossing kinks costs a real factor nothing (400 entries, 40 found
    at kinks, and a scatter of kinks crossed unseen at a few entries)."""
    rng = np.random.default_rng(5)
    n = 400
    true = rng.normal(size=n)
    sd = np.full(n, 2e-3)
    ref = true + sd * rng.normal(size=n)
    ref[:6] *= 1.05  # kinks crossed unseen: a few entries biased far beyond their noise
    g = true * factor
    c = Collective(ref, sd, pt.chi2(g - ref, sd), pt.chi2_threshold(n), np.arange(n),
                   debiased=ref.copy(), crossed=True, kinks=40)
    name, fitted = c.fit(g, np.zeros(n))
    assert name == expected
    if expected is not None:
        assert fitted == pytest.approx(factor, abs=0.005)
    assert c.resolution(g, np.zeros(n)) < 0.02
