"""The Report's fields and its text and dict views."""

import dataclasses
import json

import numpy as np
import pytest

import jgc
from jgc.examples import mlp


@pytest.fixture(scope="module")
def reports():
    ex = mlp("tanh")
    good = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    bad = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["b1_4_over_m"].grad)
    return good, bad


def test_fields(reports):
    good, bad = reports
    assert good.ok and not bad.ok
    leaf = bad.leaf("['b1']")
    assert (leaf.path, leaf.shape, leaf.n_checked, leaf.status) == ("['b1']", (5,), 5, "mismatch")
    assert leaf.pattern == "scale" and leaf.factor == pytest.approx(4.0)
    assert leaf.checked == pytest.approx(4 * leaf.numerical)
    assert leaf.autodiff == pytest.approx(leaf.numerical, rel=1e-8)
    assert leaf.max_rel_error == pytest.approx(0.75, rel=1e-6)  # |4g - g| / |4g|
    assert isinstance(leaf.worst_index, tuple) and len(leaf.worst_index) == 1
    assert 0.1 < bad.global_rel_error < 1 and good.global_rel_error < 1e-9
    assert bad.n_params == 25 + 5 + 15 + 3 and bad.mode == "full"
    assert bad.precision == "float64 (x64)" and bad.checked_source == "hand-written"
    with pytest.raises(KeyError, match="no leaf"):
        bad.leaf("['nope']")
    with pytest.raises(dataclasses.FrozenInstanceError):
        bad.ok = True


def test_global_rel_error_is_the_classic_formula(reports):
    ex = mlp("tanh")
    g = ex.bugs["b1_4_over_m"].grad(ex.params, *ex.args)
    num = jgc.numerical_grad(ex.loss, ex.params, *ex.args)
    flat = lambda t: np.concatenate([np.ravel(t[k]) for k in sorted(t)])
    a, b = flat(g), flat(num)
    expected = np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b))
    assert reports[1].global_rel_error == pytest.approx(expected, rel=1e-6)


def test_text_view(reports):
    good, bad = reports
    text = str(bad)
    lines = text.splitlines()
    assert lines[0] == "jgc gradient check: MISMATCH (1 of 4 checked leaves mismatch)"
    assert lines[1].startswith("checking: hand-written | precision: float64 (x64) | method: "
                               "central differences")
    assert "step: h = 6.1e-06·max(1,|θ|)" in lines[1]
    assert lines[2].startswith("mode: full, 48 of 48 entries checked, ")
    header = lines[4].split()
    assert header[:3] == ["leaf", "shape", "checked"] and header[-1] == "status"
    assert "hand-written" in header and "jax.grad" in header
    row = next(line for line in lines if line.startswith("['b1']"))
    assert row.split()[1:3] == ["f64[5]", "5"] and row.endswith("MISMATCH (5/5)")
    assert "global relative error: " in text and "< 1e-7 is expected" in text
    assert text.endswith(bad.diagnosis)
    assert str(good).splitlines()[0] == "jgc gradient check: OK (all 4 checked leaves agree)"
    assert repr(bad) == ("Report(ok=False, verdict='wrong_gradient', leaves=4, bad=[['b1']], "
                         f"global_rel_error={bad.global_rel_error:.1e})")


def test_text_view_when_checking_jax_grad_has_no_duplicate_column():
    ex = mlp("tanh")
    r = jgc.check_grad(ex.loss, ex.params, *ex.args)
    header = str(r).splitlines()[4].split()
    assert header.count("jax.grad") == 1 and "hand-written" not in header


def test_dict_round_trips_through_json(reports):
    for r in reports:
        d = r.to_dict()
        again = json.loads(json.dumps(d))
        assert again == d
        assert again["leaves"][1]["path"] == r.leaves[1].path
        assert again["ok"] == r.ok and again["diagnosis"] == r.diagnosis
    assert json.loads(reports[1].to_json())["verdict"] == "wrong_gradient"


def test_skipped_leaves_are_shown_with_reason():
    import jax.numpy as jnp
    r = jgc.check_grad(lambda p: jnp.sum(p["w"] ** 2), {"w": np.ones(2), "n": 3, "f": print})
    text = str(r)
    assert "skipped (int)" in text and "skipped (builtin_function_or_method)" in text
