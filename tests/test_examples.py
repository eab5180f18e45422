"""Every example network: the correct backprop passes, every planted bug is caught with exactly
the wrong leaves named and the expected pattern, in the JAX and the NumPy flavour."""

import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc.examples import ALL

CASES = [(name, xp) for name in ALL for xp in ("jax", "numpy")]
BUG_CASES = [(name, xp, bug) for name, xp in CASES
             for bug in ALL[name](xp=jnp if xp == "jax" else np).bugs]


def _make(name, xp):
    return ALL[name](xp=jnp if xp == "jax" else np)


@pytest.mark.parametrize("name,xp", CASES)
def test_correct_backprop_passes(name, xp):
    ex = _make(name, xp)
    report = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    assert report.ok, str(report)
    assert report.verdict == "ok"
    assert all(leaf.status == "ok" for leaf in report.leaves)
    assert report.global_rel_error < 1e-7  # The classic float64 rule of thumb holds too.
    if xp == "numpy":
        host = "evaluated it on the host, one perturbation at a time"
        assert any(host in n for n in report.notes)
    else:
        assert not report.notes


@pytest.mark.parametrize("name,xp,bug", BUG_CASES)
def test_planted_bug_is_caught(name, xp, bug):
    ex = _make(name, xp)
    planted = ex.bugs[bug]
    report = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=planted.grad)
    assert not report.ok
    assert {leaf.path for leaf in report.bad_leaves} == set(planted.wrong), str(report)
    for leaf in report.bad_leaves:
        assert leaf.pattern == planted.pattern, (leaf.path, leaf.pattern, leaf.factor)
        assert leaf.path in report.diagnosis
    if xp == "jax":
        # Three-way triage: jax.grad agrees with finite differences, so the hand-written
        # gradient is blamed.
        assert report.verdict == "wrong_gradient"
        assert "jax.grad agrees with finite differences" in report.diagnosis
        assert all(leaf.autodiff_status == "ok" for leaf in report.bad_leaves)
    else:
        assert report.verdict == "wrong_gradient"
        assert "jax.grad cannot break the tie" in report.diagnosis


def test_scale_bug_explained_in_words():
    ex = ALL["mlp_tanh"]()
    report = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["b1_4_over_m"].grad)
    leaf = report.leaf("['b1']")
    assert leaf.factor == pytest.approx(4.0, rel=1e-6)
    assert "the hand-written gradient of ['b1'] is 4× too large" in report.diagnosis
    assert "4./m instead of 1./m" in report.diagnosis

    report = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["missing_1_over_m"].grad)
    assert report.leaf("['W2']").factor == pytest.approx(8.0, rel=1e-6)
    assert "a 1/m averaging factor is missing (m = 8, the batch size)" in report.diagnosis


def test_regularization_bug_gives_coefficient():
    ex = ALL["softmax_l2"]()
    report = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["reg_missing"].grad)
    leaf = report.leaf("['W']")
    assert leaf.pattern == "regularization"
    assert leaf.factor == pytest.approx(-0.1, rel=1e-4)
    assert "the regularisation gradient λ·θ is missing, λ ≈ 0.1" in report.diagnosis
    report = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["reg_doubled"].grad)
    assert report.leaf("['W']").factor == pytest.approx(0.1, rel=1e-4)


def test_transpose_and_sign_are_named():
    ex = ALL["mlp_sigmoid"]()
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["W1_transposed"].grad)
    assert "is the transpose of the right gradient" in r.diagnosis
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["b2_sign"].grad)
    assert r.leaf("['b2']").factor == -1.0
    assert "has the wrong sign" in r.diagnosis
