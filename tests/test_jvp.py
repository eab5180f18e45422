"""check_jvp and check_hvp (surfaces/jvp.py): forward-mode rules and Hessian-vector products, and
the complex step (method="complex") as a check_grad method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc.examples import ALL, mlp


@jax.custom_jvp
def wrong_sin(x):
    return jnp.sin(x)


wrong_sin.defjvp(lambda p, t: (wrong_sin(p[0]), 2 * jnp.cos(p[0]) * t[0]))


@jax.custom_jvp
def right_sin(x):
    return jnp.sin(x)


right_sin.defjvp(lambda p, t: (right_sin(p[0]), jnp.cos(p[0]) * t[0]))


def test_custom_jvp_with_wrong_tangent_rule():
    x = jnp.linspace(0.1, 1.0, 4)
    r = jgc.check_jvp(wrong_sin, None, (x,))
    assert not r.ok and r.checked_source == "jax.jvp"
    leaf = r.leaf("<out>")
    assert leaf.pattern == "scale" and leaf.factor == pytest.approx(2.0, rel=1e-6)
    assert "jax.jvp disagrees with finite differences in <out>" in r.diagnosis
    assert "custom_jvp" in r.diagnosis
    assert jgc.check_jvp(right_sin, None, (x,)).ok
    assert str(r).startswith("jgc tangent rule check: MISMATCH")


def test_hand_written_jvp_rule_and_given_tangents():
    f = lambda x, w: {"y": jnp.tanh(x @ w), "s": jnp.sum(w ** 2)}
    x, w = np.ones((2, 3)) * 0.3, np.linspace(-1, 1, 12).reshape(3, 4)

    def good(p, t):
        (x, w), (tx, tw) = p, t
        y = jnp.tanh(x @ w)
        return f(x, w), {"y": (1 - y ** 2) * (tx @ w + x @ tw), "s": 2 * jnp.sum(w * tw)}

    def bad(p, t):  # forgets the dependence on x
        out, tout = good(p, t)
        x, tw = p[0], t[1]
        return out, {"y": (1 - out["y"] ** 2) * (x @ tw), "s": tout["s"]}

    assert jgc.check_jvp(f, good, (x, w)).ok
    r = jgc.check_jvp(f, bad, (x, w))
    assert [leaf.path for leaf in r.bad_leaves] == ["['y']"]
    assert r.verdict == "wrong_gradient" and "jax.jvp agrees" in r.diagnosis
    tangents = (np.ones((2, 3)), np.zeros((3, 4)))
    assert not jgc.check_jvp(f, bad, (x, w), tangents).ok
    assert jgc.check_jvp(f, bad, (x, w), (np.zeros((2, 3)), np.ones((3, 4)))).ok


def test_numpy_function_and_rule():
    f = lambda x: np.exp(np.asarray(x)) * 2
    rule = lambda p, t: (f(p[0]), f(p[0]) * np.asarray(t[0]))
    assert jgc.check_jvp(f, rule, (np.linspace(0, 1, 5),)).ok
    with pytest.raises(jgc.InputError, match="cannot trace f"):
        jgc.check_jvp(lambda x: np.exp(np.asarray(x)).tolist() and 1.0, None, (np.ones(2),))


# -- second derivatives ---------------------------------------------------------------------

@jax.custom_vjp
def cube(x):
    return x ** 3


cube.defvjp(lambda x: (x ** 3, x),
            # 3x² is right, but stop_gradient hides one x from differentiation: d/dx = 3x, not 6x
            lambda x, g: (g * 3 * x * jax.lax.stop_gradient(x),))


@jax.custom_vjp
def good_cube(x):
    return x ** 3


good_cube.defvjp(lambda x: (x ** 3, x), lambda x, g: (g * 3 * x ** 2,))


def test_custom_vjp_right_first_derivative_wrong_second():
    p = {"w": np.array([0.5, -1.0, 2.0])}
    loss = lambda p: jnp.sum(cube(p["w"]))
    assert jgc.check_grad(loss, p).ok  # first order is right
    r = jgc.check_hvp(loss, p)  # forward-over-reverse fails on custom_vjp: reverse-over-reverse
    assert not r.ok and r.leaf("['w']").factor == pytest.approx(0.5, rel=1e-6)
    assert "jax's H·v disagrees with finite differences in ['w']" in r.diagnosis
    assert jgc.check_hvp(lambda p: jnp.sum(good_cube(p["w"])), p).ok


def _mlp_hvps():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(8, 3)), rng.normal(size=8)
    p = {"W1": rng.normal(size=(3, 4)), "w2": rng.normal(size=4)}

    def forward(p, X):
        return jnp.tanh(X @ p["W1"]) @ p["w2"]

    def loss(p, X, y):
        return 0.5 * jnp.mean((forward(p, X) - y) ** 2)

    def gauss_newton(p, v, X, y):
        """J^T J v / m: the residual-curvature term of the true Hessian is missing."""
        _, jv = jax.jvp(lambda q: forward(q, X), (p,), (v,))
        _, vjp = jax.vjp(lambda q: forward(q, X), p)
        return vjp(jv / X.shape[0])[0]

    def exact(p, v, X, y):
        return jax.jvp(jax.grad(lambda q: loss(q, X, y)), (p,), (v,))[1]

    return loss, p, (X, y), gauss_newton, exact


def test_hand_written_mlp_hvp_with_missing_term():
    loss, p, args, gauss_newton, exact = _mlp_hvps()
    assert jgc.check_hvp(loss, p, *args, hvp=exact).ok
    assert jgc.check_hvp(loss, p, *args).ok  # jax's own product
    r = jgc.check_hvp(loss, p, *args, hvp=gauss_newton)
    assert not r.ok and "['W1']" in [leaf.path for leaf in r.bad_leaves]
    assert r.verdict == "wrong_gradient"
    assert "the hand-written Hessian-vector product of ['W1']" in r.diagnosis
    assert any("basis" in n for n in r.notes)  # small leaves: every basis direction too


def test_hvp_of_a_hand_written_gradient():
    ex = mlp("tanh")
    grad = lambda p, X, Y: ex.grad(p, X, Y)  # differentiate the user's own backprop
    assert jgc.check_hvp(ex.loss, ex.params, *ex.args, grad=grad).ok


# -- the complex step -----------------------------------------------------------------------

def _data_in_params_dtype(loss):
    """The example's loss with its data cast to the parameters' dtype: complex at the complex
    step, where real data meeting the parameters would be an implicit dtype promotion, which
    the suite's strict promotion mode refuses (as it would for a user)."""
    return lambda p, *args: loss(p, *(a.astype(p["W1"].dtype) for a in args))


def test_complex_step_checks_and_refuses_non_analytic_losses():
    ex = mlp("tanh")
    analytic = _data_in_params_dtype(ex.loss)
    r = jgc.check_grad(analytic, ex.params, *ex.args, grad=ex.grad, method="complex")
    assert r.ok and r.method.startswith("complex step")
    r = jgc.check_grad(analytic, ex.params, *ex.args, grad=ex.bugs["b1_4_over_m"].grad,
                       method="complex")
    assert [leaf.path for leaf in r.bad_leaves] == ["['b1']"]
    for loss in (lambda p: jnp.sum(jnp.abs(p["w"])), lambda p: jnp.sum(jnp.real(p["w"]) ** 2)):
        with pytest.raises(jgc.InputError, match="needs a complex-analytic loss"):
            jgc.check_grad(loss, {"w": np.array([1.0, -2.0])}, method="complex")


def test_complex_step_gains_digits_in_float32():
    ex = ALL["mlp_tanh"]()
    p32 = {k: np.asarray(v, np.float32) for k, v in ex.params.items()}
    a32 = tuple(np.asarray(a, np.float32) for a in ex.args)
    truth = ex.grad({k: np.asarray(v, np.float64) for k, v in p32.items()},
                    *[np.asarray(a, np.float64) for a in a32])
    err = {}
    for method in ("central", "complex"):
        g = jgc.numerical_grad(_data_in_params_dtype(ex.loss), p32, *a32, x64=False,
                               method=method)
        err[method] = np.median(np.concatenate(
            [np.abs(g[k] - truth[k]).ravel() / np.abs(truth[k]).ravel() for k in g]))
    assert err["complex"] < 1e-6 < err["central"]
    assert err["complex"] < err["central"] / 100
