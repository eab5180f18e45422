"""Real Equinox and Flax models, and assert_grad inside chex variants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

eqx = pytest.importorskip("equinox")
linen = pytest.importorskip("flax.linen")


def _data(seed=0, n=8, d=3, out=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, out))


def test_equinox_module_with_non_array_leaves():
    """An eqx.nn.MLP holds callables (the activation) and ints: passed whole, they are
    skipped; partitioned with eqx.partition, only the arrays are checked."""
    X, Y = _data()
    model = eqx.nn.MLP(3, 2, width_size=4, depth=1, activation=jnp.tanh,
                       key=jax.random.PRNGKey(0))

    def loss(m, X, Y):
        return jnp.mean((jax.vmap(m)(X) - Y) ** 2)

    r = jgc.check_grad(loss, model, X, Y)
    assert r.ok, str(r)
    assert any(leaf.status == "skipped" for leaf in r.leaves)
    assert {leaf.path for leaf in r.leaves if leaf.status == "ok"} >= {
        ".layers[0].weight", ".layers[0].bias", ".layers[1].weight", ".layers[1].bias"}

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def split_loss(p, static, X, Y):
        return loss(eqx.combine(p, static), X, Y)

    grads = eqx.filter_grad(loss)(model, X, Y)
    hand = eqx.filter(grads, eqx.is_inexact_array)
    assert jgc.check_grad(split_loss, params, static, X, Y, grad=hand).ok
    bad = eqx.tree_at(lambda m: m.layers[1].bias, hand, hand.layers[1].bias * 2)
    r = jgc.check_grad(split_loss, params, static, X, Y, grad=bad)
    assert [leaf.path for leaf in r.bad_leaves] == [".layers[1].bias"]
    assert r.leaf(".layers[1].bias").factor == pytest.approx(2.0)


def test_flax_linen_model_with_hand_written_gradient():
    X, Y = _data()
    model = linen.Dense(2)
    params = model.init(jax.random.PRNGKey(0), X)

    def loss(p, X, Y):
        return 0.5 * jnp.mean(jnp.sum((model.apply(p, X) - Y) ** 2, axis=1))

    def grad(p, X, Y):  # a dense layer's backprop, by hand
        d = (X @ p["params"]["kernel"] + p["params"]["bias"][None, :] - Y) / len(X)
        return {"params": {"kernel": X.T @ d, "bias": d.sum(0)}}

    assert jgc.check_grad(loss, params, X, Y, grad=grad).ok
    bad = lambda p, X, Y: {"params": {**grad(p, X, Y)["params"],
                                      "bias": grad(p, X, Y)["params"]["bias"] * len(X)}}
    r = jgc.check_grad(loss, params, X, Y, grad=bad)
    assert [leaf.path for leaf in r.bad_leaves] == ["['params']['bias']"]
    assert "a 1/m averaging factor is missing (m = 8, the batch size)" in r.diagnosis


class ChexVariantsTest(chex.TestCase):
    """assert_grad as a chex-style assertion, on a loss run with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_assert_grad(self):
        X, _ = _data()
        loss = self.variant(lambda p, X: jnp.sum(jnp.tanh(X @ p["w"]) ** 2))
        p = {"w": np.linspace(-1, 1, 3)}

        def grad(p, X):
            t = np.tanh(X @ p["w"])
            return {"w": X.T @ (2 * t * (1 - t ** 2))}

        jgc.assert_grad(loss, p, X, grad=grad)
        with self.assertRaisesRegex(AssertionError, r"\[jgc\].*\['w'\]"):
            jgc.assert_grad(loss, p, X, grad=lambda p, X: {"w": grad(p, X)["w"] * 3})
