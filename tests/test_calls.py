"""Calling the user's code (evaluators/calls.py) and taking jax.grad of it (evaluators/autodiff.py):
errors that name what raised, NumPy code told from JAX code without calling it, the user's
gradient function called once, and jax.grad of the one trace of the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgc._src.compat import enable_x64
from jgc._src.evaluators import autodiff as ad
from jgc._src.evaluators import calls, factory
from jgc._src.report.vocab import Mode
from jgc._src.stages import plan as pl
from jgc._src.stages.split import InputError, split_checked

PARAMS = {"w": np.array([0.5, -1.0, 2.0]), "b": np.array(0.25)}
X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])


def loss(p, X):
    return jnp.sum(jnp.tanh(X @ p["w"] + p["b"]) ** 2)


def numpy_loss(p, X):
    return float(np.sum(np.tanh(X @ p["w"] + p["b"]) ** 2))


def evaluator(fn):
    sp = split_checked(PARAMS)
    plan = pl.make_plan(sp, mode=Mode.FULL, x64=True, eps=None, samples=0, seed=0)
    return factory.make_evaluator(fn, sp, plan.theta, plan.dtypes, (X,)), sp


def test_user_call_names_what_raised_and_chains_the_original():
    def broken(x):
        raise ZeroDivisionError("division by zero in layer 2")

    with pytest.raises(InputError) as e:
        calls.user_call("grad(params, *args)", broken, 1.0, context="at params")
    assert str(e.value).startswith(
        "grad(params, *args) raised ZeroDivisionError: division by zero in layer 2")
    assert "at params" in str(e.value)
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    assert calls.user_call("f", lambda a, b=0: a + b, 2, b=3) == 5


def test_numpy_code_is_told_from_jax_code_without_calling_it():
    assert calls.numpy_code(numpy_loss)
    assert not calls.numpy_code(loss)
    assert not calls.numpy_code(len)  # a builtin: cannot tell


def test_a_gradient_pytree_is_not_a_function():
    assert calls.is_function(lambda p: p)
    assert not calls.is_function({"w": np.zeros(3)})
    with pytest.raises(InputError, match="loss must be a function loss"):
        calls.require_function({"w": 1.0})


def test_autodiff_is_jax_grad_of_the_traced_loss():
    with enable_x64(True):
        ev, sp = evaluator(loss)
        g, why, error = ad.autodiff(ev)
        want = jax.grad(loss)(PARAMS, X)
    assert why is None and error is None
    flat = np.concatenate([np.ravel(want[k]) for k in ("b", "w")])  # tree order: b, then w
    np.testing.assert_allclose(g, flat, rtol=1e-14)


def test_autodiff_of_numpy_code_says_why_not():
    with enable_x64(True):
        ev, _ = evaluator(numpy_loss)
        g, why, error = ad.autodiff(ev)
    assert g is None and why == "the loss is not traceable by JAX" and error is None


def test_the_gradient_function_is_called_once_and_mutation_is_named():
    seen = []

    def grad(p, X):
        seen.append(1)
        p["w"] *= 2.0  # a NumPy gradient that scribbles on its input
        return {"w": np.zeros(3), "b": np.zeros(())}

    with enable_x64(True):
        ev, _ = evaluator(numpy_loss)
        call = calls.call_gradient(ev, grad)
    assert len(seen) == 1
    assert call.mutated == ("params['w']",)
    assert "modified its inputs in place (params['w'])" in calls.mutation_note(call)
    assert PARAMS["w"].tolist() == [0.5, -1.0, 2.0]  # it got copies
