"""Inputs every surface takes or clearly refuses: typed PRNG keys, int and bool leaves, NumPy
backward rules of JAX layers, and every option's bad values (an InputError naming the option and
the values it accepts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import W, X, tanh_grad, tanh_loss

import jgc
from jgc._src.compat import enable_x64

# -- a typed PRNG key among the arguments --------------------------------------------------------

def _dropout_loss(p, X, key):
    keep = jax.random.bernoulli(key, 0.7, X.shape)
    return tanh_loss(p, jnp.where(keep, X / 0.7, 0.0))


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_a_typed_prng_key_in_args_is_passed_through(make_key):
    key = make_key(3)
    r = jgc.check_grad(_dropout_loss, W, X, key)
    assert r.ok, str(r)
    with enable_x64(True):  # the check's precision: the mask is drawn in float64 there
        keep = np.asarray(jax.random.bernoulli(key, 0.7, X.shape))
    right = tanh_grad(W, np.where(keep, X / 0.7, 0.0))
    assert jgc.check_grad(_dropout_loss, W, X, key, grad=lambda p, X, k: right).ok
    assert not jgc.check_grad(_dropout_loss, W, X, key, grad=lambda p, X, k: 2 * right).ok


def test_the_command_line_checks_a_file_with_a_typed_key(tmp_path):
    from jgc._src.surfaces.cli import main

    path = tmp_path / "model.py"
    path.write_text(
        "import jax, jax.numpy as jnp, numpy as np\n"
        "def loss(p, x, key):\n"
        "    keep = jax.random.bernoulli(key, 0.7, x.shape)\n"
        "    return jnp.sum(jnp.tanh(jnp.where(keep, x, 0.0) @ p) ** 2)\n"
        "params = np.ones((3, 2)) * 0.3\n"
        "args = (np.arange(6.0).reshape(2, 3) / 6, jax.random.key(0))\n")
    assert main(["check", str(path)]) == 0


# -- check_hvp skips int and bool leaves as check_grad does -------------------------------------

def test_check_hvp_holds_int_and_bool_leaves_fixed():
    params = {"w": np.linspace(-1.0, 1.0, 6), "steps": np.int32(3), "on": np.array(True),
              "idx": np.arange(3)}

    def loss(p):
        w = p["w"][p["idx"]] * p["steps"].astype(p["w"].dtype)
        return jnp.where(p["on"], jnp.sum(jnp.sin(w) * p["w"][:3]), 0.0)

    r = jgc.check_hvp(loss, params)
    assert r.ok, str(r)
    assert {leaf.path: leaf.status for leaf in r.leaves} == {
        "['idx']": "skipped", "['on']": "skipped", "['steps']": "skipped", "['w']": "ok"}

    def hvp(p, v):  # right only for w: a wrong factor must be seen
        return {"w": 2 * jax.jvp(jax.grad(lambda w: loss({**p, "w": w})), (p["w"],),
                                 (v["w"],))[1]}

    bad = jgc.check_hvp(loss, params, hvp=hvp)
    assert not bad.ok and bad.leaf("['w']").factor == pytest.approx(2.0, rel=1e-6)


# -- check_vjp with a NumPy backward of a jax.numpy layer ------------------------------------

def test_check_vjp_accepts_a_numpy_backward_of_a_jax_layer():
    layer = lambda x, w: jnp.tanh(x @ w)

    def backward(dy, x, w):  # NumPy, as a student writes it
        y = np.tanh(x @ w)
        dz = dy * (1 - y ** 2)
        return dz @ w.T, x.T @ dz

    assert jgc.check_vjp(layer, backward, (X, W)).ok
    wrong = lambda dy, x, w: (backward(dy, x, w)[0], 2 * backward(dy, x, w)[1])
    r = jgc.check_vjp(layer, wrong, (X, W))
    assert not r.ok and [leaf.path for leaf in r.bad_leaves] == ["[1]"]
    assert not any("TracerArrayConversionError" in n for n in r.notes)


# -- bad option values ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 1.5, None, True, "0"])
def test_a_bad_seed_is_refused_by_name(seed):
    with pytest.raises(jgc.InputError, match=rf"seed={seed!r}: expected a non-negative integer"):
        jgc.check_grad(tanh_loss, W, X, seed=seed)
    with pytest.raises(jgc.InputError, match="seed="):
        jgc.check_jvp(jnp.sin, None, (np.ones(3),), seed=seed)


def test_zero_directions_are_refused_by_name():
    with pytest.raises(jgc.InputError, match="no direction to check: n_tangents=0 random ones"):
        jgc.check_jvp(jnp.sin, None, (np.ones(3),), n_tangents=0)
    with pytest.raises(jgc.InputError, match="n_directions=0 with mode='directional'"):
        jgc.check_hvp(lambda p: jnp.sum(p ** 3), np.ones(3), n_directions=0, mode="directional")
    with pytest.raises(jgc.InputError, match=r"n_tangents=-1: expected a non-negative integer"):
        jgc.check_jvp(jnp.sin, None, (np.ones(3),), n_tangents=-1)
    # A leaf small enough for its basis directions: auto mode needs no random one.
    assert jgc.check_hvp(lambda p: jnp.sum(p ** 3), np.ones(3), n_directions=0).ok
    assert jgc.check_jvp(jnp.sin, None, (np.ones(3),), n_tangents=0, mode="full").ok


def test_a_memory_budget_too_small_for_one_evaluation_names_the_minimum():
    with pytest.raises(jgc.InputError) as e:
        jgc.check_grad(tanh_loss, W, X, memory_budget=1)
    text = str(e.value)
    assert text.startswith("memory_budget=1: one perturbed evaluation of this loss needs about")
    assert "more than the budget of 1 byte" in text and "Raise memory_budget to at least" in text
    assert "0 MiB" not in text and "directional" not in text
    needed = int(text.split("Raise memory_budget to at least ")[1].split(" bytes")[0])
    assert jgc.check_grad(tanh_loss, W, X, memory_budget=needed).ok


@pytest.mark.parametrize("option, value, words", [
    ("samples", 0, "samples=0: mode='sample' checks"),
    ("samples", 2.5, "samples=2.5"),
    ("has_aux", "yes", "has_aux='yes': expected True or False"),
    ("progress", "on", "progress='on': expected True, False or None"),
    ("eps", "1e-3", "eps='1e-3': the step must be a positive finite number"),
    ("rtol", -1.0, "rtol=-1.0: expected a non-negative number"),
])
def test_other_bad_options_are_refused_by_name(option, value, words):
    with pytest.raises(jgc.InputError, match=words.replace("(", r"\(")):
        jgc.check_grad(tanh_loss, W, X, **{option: value})


def test_check_jvp_refuses_clearly_when_jaxs_own_jvp_fails():
    """f_jvp=None checks jax.jvp(f); where JAX cannot compute it (forward mode through a
    custom_vjp rule, or an XLA runtime failure), that is an InputError saying so, not a crash."""
    @jax.custom_vjp
    def f(x):
        return jax.numpy.sin(x)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * jax.numpy.cos(x),))
    with pytest.raises(jgc.InputError, match=r"jax\.jvp\(f, primals, tangents\) raised"):
        jgc.check_jvp(f, None, (np.linspace(0.1, 1.0, 4),))
