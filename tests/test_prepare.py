"""One carrier for every surface: what `prepare` guarantees holds for check_grad, check_vjp,
check_jvp, check_hvp and numerical_grad alike (refusals, precision, finite f0)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import W, X, snapshot, tanh_loss

import jgc

F = lambda x, w: jnp.tanh(x @ w)  # a layer, for the rule surfaces
PRIMALS = (X, W)


def _scaled_vjp(scale):
    return lambda dy, x, w: tuple(scale * g for g in jax.vjp(F, x, w)[1](dy))


def _scaled_jvp(scale):
    return lambda p, t: (F(*p), scale * jax.jvp(F, p, t)[1])


# -- a direction that verifies nothing is refused -------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 2.0, 3.0])
def test_a_zero_cotangent_is_refused_not_reported_ok(scale):
    """Along a zero cotangent every VJP is zero, so a 2x or 3x wrong rule would pass."""
    zero = np.zeros((5, 3))
    with pytest.raises(jgc.InputError, match="cotangent is zero everywhere: along a zero "
                                             "direction every derivative is zero"):
        jgc.check_vjp(F, _scaled_vjp(scale), PRIMALS, cotangent=zero)
    assert jgc.check_vjp(F, _scaled_vjp(scale), PRIMALS).ok == (scale == 1.0)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_zero_tangent_is_refused_not_reported_ok(scale):
    zero = (np.zeros_like(X), np.zeros_like(W))
    with pytest.raises(jgc.InputError, match="tangents is zero everywhere"):
        jgc.check_jvp(F, _scaled_jvp(scale), PRIMALS, zero)
    half = (np.ones_like(X), np.zeros_like(W))  # zero in one primal only: still a direction
    assert jgc.check_jvp(F, _scaled_jvp(scale), PRIMALS, half).ok == (scale == 1.0)


def test_a_non_finite_direction_is_refused_by_name():
    bad = np.ones((5, 3))
    bad[0, 1] = np.nan
    with pytest.raises(jgc.InputError, match=r"cotangent has 1 non-finite entry: a direction "
                                             "must be finite"):
        jgc.check_vjp(F, None, PRIMALS, cotangent=bad)
    w_bad = np.ones_like(W)
    w_bad[0, 0] = np.inf
    with pytest.raises(jgc.InputError, match=r"tangents\[1\] has 1 non-finite entry"):
        jgc.check_jvp(F, None, PRIMALS, (np.ones_like(X), w_bad))


# -- non-finite inputs: refused the same way by every surface ----------------------------------

def _nan_x():
    x = X.copy()
    x[2, 1] = np.nan
    return x


SURFACES = {
    "check_grad": lambda x: jgc.check_grad(lambda p, x: tanh_loss(p, x), W, x),
    "numerical_grad": lambda x: jgc.numerical_grad(lambda p, x: tanh_loss(p, x), W, x),
    "check_vjp": lambda x: jgc.check_vjp(F, None, (x, W)),
    "check_jvp": lambda x: jgc.check_jvp(F, None, (x, W)),
    "check_hvp": lambda x: jgc.check_hvp(lambda p, x: tanh_loss(p, x), W, x),
}


@pytest.mark.parametrize("surface", SURFACES)
def test_nan_at_the_inputs_is_refused_naming_them_on_every_surface(surface):
    x = _nan_x()
    before = snapshot(x)
    with pytest.raises(jgc.InputError, match=r"(args|primals)\[0\] \(1 non-finite entry\)"):
        SURFACES[surface](x)
    assert snapshot(x) == before


# -- precision: stated from the plan, arguments promoted, on every surface ----------------------

def test_check_hvp_promotes_float32_arguments_and_states_the_precision():
    x32 = X.astype(np.float32)
    r = jgc.check_hvp(lambda p, x: tanh_loss(p, x), W.astype(np.float32), x32)
    assert r.ok and r.precision == "float64 (x64)", str(r)
    assert any("promoted to float64" in n and "args[0] (float32)" in n for n in r.notes)
    r32 = jgc.check_hvp(lambda p, x: tanh_loss(p, x), W.astype(np.float32), x32, x64=False)
    assert r32.precision == "float32"


@pytest.mark.parametrize("x64, name", [(True, "float64 (x64)"), (False, "float32")])
def test_check_jvp_states_the_precision_it_ran_in(x64, name):
    primals = (X.astype(np.float32), W.astype(np.float32))
    assert jgc.check_jvp(F, None, primals, x64=x64).precision == name
    assert jgc.check_vjp(F, None, primals, x64=x64).precision == name


# -- the same randomness verdict everywhere ---------------------------------------------------

def test_hidden_randomness_is_reported_by_the_rule_surfaces_too():
    rng = np.random.default_rng(0)
    noisy = lambda x: np.tanh(x) + 1e-3 * rng.normal(size=np.shape(x))  # NumPy: runs on host
    r = jgc.check_jvp(noisy, lambda p, t: (noisy(*p), (1 - np.tanh(p[0]) ** 2) * t[0]),
                      (np.linspace(-1, 1, 4),))
    assert r.verdict == "randomness" and not r.ok
    with pytest.raises(jgc.InputError, match="different values for identical inputs"):
        jgc.numerical_grad(lambda p: float(np.sum(noisy(p))), np.linspace(-1, 1, 4))
