"""method="complex" (stages/complexstep.py): exact to rounding on an analytic loss, refused on a
loss that is not analytic or on complex parameters, each with the fix."""

import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.stages import complexstep
from jgc._src.stages.split import split_checked

X = np.linspace(0.2, 1.4, 7)


def analytic(x):
    return jnp.sum(jnp.exp(x) * jnp.sin(x) / (1.0 + x ** 2))


def test_the_complex_step_is_exact_to_rounding():
    g = jgc.numerical_grad(analytic, X, method="complex")
    want = (np.exp(X) * (np.sin(X) + np.cos(X)) / (1 + X ** 2)
            - np.exp(X) * np.sin(X) * 2 * X / (1 + X ** 2) ** 2)
    np.testing.assert_allclose(g, want, rtol=1e-14)
    central = jgc.numerical_grad(analytic, X)
    assert np.max(np.abs(central - want)) > 10 * np.max(np.abs(g - want))
    assert jgc.check_grad(analytic, X, method="complex").ok


def test_a_loss_that_is_not_analytic_is_refused():
    with pytest.raises(jgc.InputError, match=r"method='complex' needs a complex-analytic loss, "
                                             r"but at <params>\[\d\] the complex step gives"):
        jgc.check_grad(lambda x: jnp.sum(jnp.abs(x) ** 3), X - 0.8, method="complex")


def test_complex_parameters_are_refused_naming_them():
    sp = split_checked({"z": np.ones(2, np.complex128), "r": np.ones(2)})
    with pytest.raises(jgc.InputError, match=r"cannot check complex parameters \(\['z'\]\)"):
        complexstep.refuse_complex_leaves(sp)
    complexstep.refuse_complex_leaves(split_checked({"r": np.ones(2)}))  # real: accepted
