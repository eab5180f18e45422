"""Unit tests of the stages on their own: estimate (the error model, the kink statistic, the
stencil schedule), plan (steps, samples), evaluate (chunking), patterns and diagnose (each bug
pattern), the vocabularies, and the leaf row shared by the text and HTML views."""

import html
import math

import numpy as np
import pytest

import jgc
from jgc._src.evaluators import dense, factory
from jgc._src.report.render import to_html
from jgc._src.report.report import LeafReport
from jgc._src.report.text import leaf_cells, leaf_status
from jgc._src.report.vocab import Entry, Method, Mode, Pattern, Status, Verdict
from jgc._src.stages import differences as dq
from jgc._src.stages import errormodel as em
from jgc._src.stages import estimate as es
from jgc._src.stages import plan as pl
from jgc._src.stages.diagnose import triage
from jgc._src.stages.patterns import Collective, find_pattern
from jgc._src.stages.split import InputError, split_checked
from jgc.examples import mlp

U64 = float(np.finfo(np.float64).eps)


# -- estimate ---------------------------------------------------------------------------------

def derivative_of(f, x, checked, h=None, **schedule):
    """The stencil schedule on a scalar function f at the points x (one probe each), with
    exact steps: what check_grad does for one entry per probe."""
    x = np.asarray(x, np.float64)
    h = U64 ** (1 / 3) * np.maximum(1.0, np.abs(x)) if h is None else np.full(len(x), h)

    def evaluate(s, where):
        step = dq.SCALES[s] * h[where]
        hp, hm = (x[where] + step) - x[where], x[where] - (x[where] - step)
        return es.Sides(f(x[where] + hp), f(x[where] - hm), hp, hm, f0=f(x[where]))

    d = dq.differences(0.0, len(x), None, U64, True, f_scale=float(np.max(np.abs(f(x)))))
    return es.derivative(evaluate, d, np.asarray(checked, np.float64), 0.0,
                         schedule=es.Schedule(**schedule))


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


# -- plan -------------------------------------------------------------------------------------

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


# -- evaluate: chunking -----------------------------------------------------------------------

def _evaluator(budget, width=12):
    ex = mlp("tanh", width=width)
    sp = split_checked(ex.params)
    plan = pl.make_plan(sp, mode=Mode.FULL, x64=True, eps=None, samples=0, seed=0)
    return factory.make_evaluator(ex.loss, sp, plan.theta, plan.dtypes, tuple(ex.args),
                                   memory_budget=budget), sp


def test_chunks_fit_the_memory_budget_and_grow_with_it():
    small, sp = _evaluator(8 * 2**10)
    large, _ = _evaluator(2**30)
    m = 2 * sp.n
    per = small.bytes_per_evaluation(sp.n)
    assert small.chunk_size(m, sp.n) * per <= 8 * 2**10
    assert large.chunk_size(m, sp.n) > small.chunk_size(m, sp.n)
    tiny, _ = _evaluator(16)
    with pytest.raises(InputError, match=r"memory_budget=16: one perturbed evaluation of this "
                       r"loss needs about .* KiB .*more than the budget of 16 bytes, and every "
                       r"mode evaluates at least one at a time. Raise memory_budget to at least "
                       rf"{per} bytes"):
        tiny.chunk_size(m, sp.n)


def test_a_check_runs_in_the_budgets_chunks(monkeypatch):
    """The sizes a check actually uses, seen from inside: all within a small budget, larger
    without it, and the same numbers either way."""
    sizes = []
    original = dense.DenseEvaluator.chunk_size

    def spy(self, m, batched):
        out = original(self, m, batched)
        sizes.append((out, out * self.bytes_per_evaluation(batched), self.memory_budget))
        return out

    monkeypatch.setattr(dense.DenseEvaluator, "chunk_size", spy)
    ex = mlp("tanh")
    small = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, memory_budget=4096)
    small_sizes, sizes[:] = list(sizes), []
    big = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    assert small_sizes and all(nbytes <= budget for _, nbytes, budget in small_sizes)
    assert max(c for c, _, _ in sizes) > max(c for c, _, _ in small_sizes)
    assert small.ok and [x.numerical for x in small.leaves] == [x.numerical for x in big.leaves]


# -- patterns and diagnose --------------------------------------------------------------------

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
        c = Collective(ref, sd, em.chi2(g - ref, sd), em.chi2_threshold(64), np.arange(64))
        assert c.significant and c.fit(g, np.zeros(64))[0] == expected


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


# -- vocabularies -----------------------------------------------------------------------------

def test_vocabularies_are_their_strings():
    assert Status.MISMATCH == "mismatch" and f"{Verdict.OK}" == "ok" and repr(Mode.FULL) == "'full'"
    assert Mode.choices() == ("auto", "full", "sample", "directional")
    assert Method.choices() == ("central", "richardson", "complex")
    with pytest.raises(InputError, match=r"mode='fast' is not one of \('auto'"):
        Mode.parse("fast", "mode")
    assert [s for s in Status if s.verified] == [Status.OK, Status.KINK, Status.SKIPPED]


def test_the_cli_offers_every_mode_and_method():
    from jgc._src.surfaces.cli import build_parser

    check = build_parser()._subparsers._group_actions[0].choices["check"]
    opts = {a.dest: a for a in check._actions}
    assert tuple(opts["mode"].choices) == Mode.choices()
    assert tuple(opts["method"].choices) == Method.choices()


# -- the leaf row -----------------------------------------------------------------------------

ROWS = [
    (LeafReport("['W']", (3, 2), "float32", 6, Status.MISMATCH, max_rel_error=0.5,
                worst_index=(1, 0), numerical=2.0, checked=3.0, autodiff=2.0, n_mismatch=2),
     ["['W']", "f32[3,2]", "6", "5.0e-01", "(1, 0)", " 2.000000e+00", " 3.000000e+00",
      " 2.000000e+00", "MISMATCH (2/6)"]),
    (LeafReport("['b']", (3,), "float32", 3, Status.MISMATCH, max_rel_error=0.01),
     ["['b']", "f32[3]", "3", "1.0e-02", "-", "-", "-", "-", "MISMATCH (as a whole)"]),
    (LeafReport("", (4,), "float64", 4, Status.UNRESOLVED, max_rel_error=0.1, resolution=3.0),
     ["<params>", "f64[4]", "4", "1.0e-01", "-", "-", "-", "-", "UNRESOLVED (resolution ≥100%)"]),
    (LeafReport("['k']", (8,), "float64", 8, Status.KINK, n_kink=2, directions=2),
     ["['k']", "f64[8]", "8+2dir", "0.0e+00", "-", "-", "-", "-", "kink (2 at kinks)"]),
    (LeafReport("['n']", (), "int32", 0, Status.SKIPPED, reason="not a float array"),
     ["['n']", "i32[]", "0", "-", "-", "-", "-", "-", "skipped (not a float array)"]),
]


@pytest.mark.parametrize("leaf, cells", ROWS, ids=[r[0].status for r in ROWS])
def test_one_leaf_row_for_text_and_html(leaf, cells):
    """The row is pinned, and both views print exactly it (the text view once diverged from
    the HTML one: 'f32[3] ... MISMATCH (as a whole)' against 'float32[3] ... MISMATCH')."""
    assert leaf_cells(leaf) == cells and leaf_status(leaf) == cells[-1]
    report = jgc.Report(ok=False, verdict=Verdict.WRONG_GRADIENT, leaves=(leaf,),
                        global_rel_error=0.1, diagnosis="", checked_source="hand-written",
                        precision="float64", method="central", mode="full", step="h",
                        n_params=6, n_checked=6, n_evaluations=12, seconds=0.1)
    text_row = str(report).splitlines()[5]
    assert text_row.split() == " ".join(cells).split()
    page = to_html(report)
    for cell in cells:
        assert f">{html.escape(cell)}</td>" in page
    assert Status(leaf.status).colour in page


def test_statuses_and_verdicts_have_their_colours_in_html():
    ex = mlp("tanh")
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["b1_4_over_m"].grad)
    page = r._repr_html_()
    assert Verdict.WRONG_GRADIENT.colour in page and ">MISMATCH</span>" in page
    assert page.count(Status.OK.colour) >= 3  # the three correct leaves



def test_auto_deadline_predicts_other_leaves_from_their_work():
    """mode="auto" times one program and scales the leaves still to come by their planned work
    (structured leaves differ by orders of magnitude); a program's first chunk (buffers,
    threads) neither decides alone nor sets the rate."""
    from jgc._src.evaluators.deadline import Deadline, TooSlow

    def deadline(seconds):
        d = Deadline(seconds=seconds, factor=1.0, n_leaves=2)
        d.expect(0, 1000, work=1.0)  # a cheap leaf, timed first
        d.expect(1, 10, work=1e4)  # a leaf whose evaluations do 10,000x the work
        d.next_program(0)
        d.observe(100, 100, 1.0)  # a slow first chunk (0.01 s each) alone does not decide
        return d

    # Steady 1e-4 s per evaluation per unit of work. Still to do: 800 x 1 + 10 x 1e4 units,
    # 10.08 s, after 1.01 s run.
    roomy = deadline(20.0)
    roomy.observe(100, 100, 0.01)
    assert roomy.unit_rate == pytest.approx(1e-4)
    tight = deadline(10.0)
    with pytest.raises(TooSlow) as e:
        tight.observe(100, 100, 0.01)
    assert e.value.predicted == pytest.approx(1.01 + 800 * 1e-4 + 10 * 1e4 * 1e-4)


# -- sampling and the XLA options ---------------------------------------------------------------

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


def test_light_xla_options_follow_the_predicted_work():
    from jgc._src.evaluators import programs, xla

    assert xla.light(1e6) and not xla.light(1e12) and not xla.light(None)
    assert not xla.light(1e6, forced=False)
    assert xla.light(1e12, forced=True)
    # A tiny check's batch program is compiled light; the key records it.
    ex = mlp("tanh", seed=11)
    programs.CACHE.entries.clear()
    assert jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad).ok
    kinds = {key[0]: key[-1] for key in programs.CACHE.entries}
    assert kinds["losses_at"] is True and kinds["autodiff"] is True
