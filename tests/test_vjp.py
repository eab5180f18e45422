"""check_vjp on CS231n-style NumPy layers and on JAX functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc.examples.layers import LAYERS

BUGS = [(name, bug) for name, layer in LAYERS.items() for bug in layer.bugs]


@pytest.mark.parametrize("name", LAYERS)
def test_correct_layer_backward_passes(name):
    layer = LAYERS[name]
    r = jgc.check_vjp(layer.f, layer.f_vjp, layer.primals)
    assert r.ok, str(r)
    assert [leaf.path for leaf in r.leaves] == [f"[{i}]" for i in range(len(layer.primals))]


@pytest.mark.parametrize("name,bug", BUGS)
def test_layer_bug_names_the_wrong_input(name, bug):
    layer = LAYERS[name]
    planted = layer.bugs[bug]
    r = jgc.check_vjp(layer.f, planted.f_vjp, layer.primals)
    assert not r.ok
    assert {leaf.path for leaf in r.bad_leaves} == set(planted.wrong), str(r)


def test_cotangent_seeded_or_given():
    layer = LAYERS["affine"]
    r1 = jgc.check_vjp(layer.f, layer.bugs["db_mean"].f_vjp, layer.primals, seed=1)
    r2 = jgc.check_vjp(layer.f, layer.bugs["db_mean"].f_vjp, layer.primals, seed=1)
    assert r1.leaf("[2]").numerical == r2.leaf("[2]").numerical
    dout = np.ones((4, 5))
    r3 = jgc.check_vjp(layer.f, layer.bugs["db_mean"].f_vjp, layer.primals, cotangent=dout)
    assert r3.leaf("[2]").numerical == pytest.approx(4.0)  # d/db sum(out) = batch size
    assert r3.leaf("[2]").factor == pytest.approx(0.25)
    with pytest.raises(jgc.InputError, match="cotangent must be shaped like f's output"):
        jgc.check_vjp(layer.f, layer.f_vjp, layer.primals, cotangent=np.ones(3))


def test_jax_function_and_jax_vjp():
    f = lambda x, w: jnp.tanh(x @ w)
    x, w = np.ones((2, 3)) * 0.3, np.linspace(-1, 1, 12).reshape(3, 4)
    assert jgc.check_vjp(f, None, (x, w)).ok  # jax's own VJP
    good = lambda dy, x, w: jax.vjp(f, x, w)[1](dy)
    assert jgc.check_vjp(f, good, (x, w)).ok
    bad = lambda dy, x, w: (dy * (1 - f(x, w) ** 2) @ w.T, x.T @ dy)  # forgot tanh' in dw
    r = jgc.check_vjp(f, bad, (x, w))
    assert [leaf.path for leaf in r.bad_leaves] == ["[1]"]


def test_single_primal_may_return_bare_gradient():
    f = lambda x: np.sin(x)
    assert jgc.check_vjp(f, lambda dy, x: dy * np.cos(x), np.linspace(0, 1, 5)).ok


def test_wrong_arity_is_explained():
    layer = LAYERS["affine"]
    with pytest.raises(jgc.InputError, match=r"one gradient per primal \(3\).*length 2"):
        jgc.check_vjp(layer.f, lambda dout, x, w, b: (x, w), layer.primals)
