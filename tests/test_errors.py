"""Bad input gets a clear error that names the leaf or argument and suggests the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

P = {"W": np.ones((2, 3)), "b": np.zeros(3)}
X = np.ones((4, 2))


def loss(p, x):
    return jnp.sum(jnp.tanh(x @ p["W"] + p["b"][None, :]))


STRUCTURE_CASES = {
    "missing key": (lambda p, x: {"W": np.ones((2, 3))},
                    "First difference: params['b'] (f64[3]) has no entry in grad(params, *args)"),
    "extra key": (lambda p, x: {**p, "c": 1.0},
                  "First difference: grad(params, *args)['c'] is not a leaf of params"),
    "wrong shape": (lambda p, x: {"W": np.ones((3, 2)), "b": p["b"]},
                    "grad(params, *args)['W'] has shape (3, 2) but params['W'] has shape (2, 3)"),
    "none leaf": (lambda p, x: {"W": None, "b": p["b"]},
                  "grad(params, *args)['W'] is None but params['W'] is a checked f64[2,3] leaf"),
    "list for dict": (lambda p, x: [p["W"], p["b"]],
                      "grad(params, *args)[0] is not a leaf of params"),
    "ready pytree": ({"W": np.ones((2, 3))}, "params['b'] (f64[3]) has no entry in grad"),
}


@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_wrong_gradient_structure_shows_both(case):
    grad, first = STRUCTURE_CASES[case]
    with pytest.raises(jgc.InputError) as info:
        jgc.check_grad(loss, P, X, grad=grad)
    msg = str(info.value)
    assert first in msg
    assert "  params: {'W': f64[2,3], 'b': f64[3]}" in msg  # both structures, side by side
    assert msg.count("\n  ") >= 2
    assert "shaped like params" in msg  # the fix


def test_same_entries_other_shape_gets_reshape_hint():
    with pytest.raises(jgc.InputError, match="reshape it to the parameter's shape"):
        jgc.check_grad(loss, P, X, grad=lambda p, x: {"W": p["W"], "b": p["b"][None]})


def test_flat_vector_of_wrong_length():
    with pytest.raises(jgc.InputError, match="flat vector of length 7, but params has 9 checked"):
        jgc.check_grad(loss, P, X, grad=np.ones(7))


def test_non_numeric_and_complex_gradient_leaves():
    with pytest.raises(jgc.InputError, match=r"\['W'\] has dtype <U4; expected a floating"):
        jgc.check_grad(loss, P, X, grad=lambda p, x: {"W": "oops", "b": p["b"]})
    with pytest.raises(jgc.InputError, match=r"\['b'\] is complex.*params\['b'\] is real"):
        jgc.check_grad(loss, P, X, grad=lambda p, x: {"W": p["W"],
                                                      "b": p["b"].astype(jnp.complex128) + 1j})
    # A complex dtype with zero imaginary parts (ravel_pytree of a mixed tree) is real enough.
    assert jgc.check_grad(loss, P, X, grad=lambda p, x: jax.tree_util.tree_map(
        lambda g: g.astype(jnp.complex128), jax.grad(loss)(p, x))).ok


@pytest.mark.parametrize("call,match", [
    (lambda: jgc.check_grad(lambda p, x: x @ p["W"], P, X),
     r"loss must return a scalar, but it returned an array of shape \(4, 3\).*\.mean\(\)"),
    (lambda: jgc.check_grad(lambda p, x: np.int64(3), P, X),
     r"loss must return a real floating-point scalar"),
    (lambda: jgc.check_grad(P, loss, X), r"loss must be a function.*wrong order"),
    (lambda: jgc.check_grad(lambda p, x: (x[:, :2].astype(p["W"].dtype) @ p["W"]).sum(),
                            {"W": np.ones((2, 3)) * 1j}, X),
     r"loss must return a real scalar, but it returned a complex one.*jnp.abs\(z\) \*\* 2"),
    (lambda: jgc.check_grad(loss, {}, X), r"no floating-point leaves.*\(it is empty\)"),
    (lambda: jgc.check_grad(loss, {"n": 3, "s": "a"}, X),
     r"no floating-point leaves to check \(its leaves: \['n'\]: int, \['s'\]: str\)"),
    (lambda: jgc.check_grad(lambda p, x: jnp.log(p["b"]).sum(), P, X),
     r"the loss is -inf at params \(before any perturbation\)"),
    (lambda: jgc.check_grad(lambda p, x: jnp.sqrt(p["b"]).sum(), P, X),
     r"not at perturbed points: 3 of 9 entries.*first at \['b'\]\[0\].*smaller one"),
    (lambda: jgc.check_grad(lambda p, x: p["nope"], P, X),
     r"loss\(params, \*args\) raised KeyError: 'nope'\n  at params"),
    (lambda: jgc.check_grad(loss, P, X, mode="fast"), r"mode='fast' is not one of"),
    (lambda: jgc.check_grad(loss, P, X, eps=-1.0), r"eps=-1.0: the step must be a positive"),
    (lambda: jgc.check_grad(loss, P, X, rtol=-1), r"rtol=-1: expected a non-negative"),
    (lambda: jgc.check_grad(loss, P, X, x64="yes"), r"x64='yes': expected True"),
    (lambda: jgc.check_grad(lambda p: np.asarray(p["W"]).sum(), P, grad=None),
     r"grad=None asks jgc to check jax.grad, but the loss is not traceable"),
    (lambda: jgc.check_grad(loss, P, X, grad=lambda p, x: 1 / 0),
     r"grad\(params, \*args\) raised ZeroDivisionError"),
])
def test_bad_input_messages(call, match):
    with pytest.raises(jgc.InputError, match=match):
        call()


def test_loss_raising_at_a_perturbed_point_names_it():
    def flaky(p):
        if p["b"][1] > 1e-7:
            raise RuntimeError("boom")
        return np.sum(p["W"])

    with pytest.raises(jgc.InputError, match=r"RuntimeError: boom\n  while evaluating the "
                       r"perturbed point \['b'\]\[1\] \+6\.06e-06"):
        jgc.check_grad(flaky, P, grad=lambda p: p)


def test_input_error_is_a_value_error():
    assert issubclass(jgc.InputError, ValueError)
