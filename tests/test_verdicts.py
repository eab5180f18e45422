"""Verdicts you can trust: float32, kinks, randomness, noise, Richardson, overrides."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.stages import differences as dq
from jgc.examples import ALL, conv_maxpool, dropout, mlp


def _f32(tree):
    return jax.tree_util.tree_map(
        lambda v: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
        else v, tree)


@pytest.mark.parametrize("name", ALL)
def test_float32_correct_passes_and_one_percent_bugs_are_caught(name):
    """At the user's own float32 precision: no false alarm, and a 1% error in any one leaf is
    caught and attributed to that leaf alone."""
    ex = ALL[name]()
    p, args = _f32(ex.params), _f32(ex.args)
    g = jax.tree_util.tree_map(np.asarray, jax.jit(jax.grad(ex.loss))(p, *args))
    r = jgc.check_grad(ex.loss, p, *args, grad=g, x64=False)
    assert r.ok, str(r)
    assert r.precision == "float32" and r.noise is not None
    for leaf in g:
        bad = dict(g)
        bad[leaf] = g[leaf] * 1.01
        r = jgc.check_grad(ex.loss, p, *args, grad=bad, x64=False)
        assert [x.path for x in r.bad_leaves] == [f"['{leaf}']"], (leaf, str(r))


def test_float32_small_bug_below_entry_error_bars_is_named_as_scale():
    ex = mlp("sigmoid")
    p, args = _f32(ex.params), _f32(ex.args)
    g = jax.tree_util.tree_map(np.asarray, jax.grad(ex.loss)(p, *args))
    g["b2"] = g["b2"] * 1.01
    r = jgc.check_grad(ex.loss, p, *args, grad=g, x64=False)
    leaf = r.leaf("['b2']")
    # b2 (3 entries) is caught entry by entry or by the leaf-level test; either way the fit
    # names the factor, and a leaf caught only as a whole says so in its row.
    assert leaf.status == "mismatch"
    assert leaf.pattern == "scale" and leaf.factor == pytest.approx(1.01, abs=2e-3)
    assert ("MISMATCH (as a whole)" in str(r)) == (leaf.n_mismatch == 0)


@pytest.mark.parametrize("xp", [jnp, np])
def test_relu_exactly_at_zero_is_a_kink_not_a_failure(xp):
    """A zero input row and a zero bias put every hidden unit of that row exactly at z = 0."""
    ex = mlp("relu", xp=xp)
    p = dict(ex.params, b1=np.zeros(5))
    X = ex.args[0].copy()
    X[0] = 0
    r = jgc.check_grad(ex.loss, p, X, ex.args[1], grad=ex.grad)
    assert r.ok, str(r)
    b1 = r.leaf("['b1']")
    assert b1.status == "kink" and b1.n_kink == 5
    assert "5 entries of ['b1'] sit on a kink" in r.diagnosis
    assert "that is expected, not a failure" in r.diagnosis
    # A real bug at the kink is still caught.
    r = jgc.check_grad(ex.loss, p, X, ex.args[1], grad=ex.bugs["b1_4_over_m"].grad)
    assert [leaf.path for leaf in r.bad_leaves] == ["['b1']"]


@pytest.mark.parametrize("xp", [jnp, np])
def test_max_pool_ties_are_kinks(xp):
    """A constant image with one bright pixel and a kernel whose first tap is zero: in the first
    pooling window four positions tie, and only K[:, 0] can break the tie."""
    X = np.full((2, 1, 6, 6), 0.5)
    X[:, 0, 0, 0] = 1.5
    ex = conv_maxpool(xp=xp, X=X)
    K = ex.params["K"].copy()
    K[:, 0] = 0
    p = dict(ex.params, K=K)
    r = jgc.check_grad(ex.loss, p, *ex.args, grad=ex.grad)
    assert r.ok, str(r)
    assert r.leaf("['K']").status == "kink" and r.leaf("['K']").n_kink >= 1
    r = jgc.check_grad(ex.loss, p, *ex.args, grad=ex.bugs["dK_sign"].grad)
    assert [leaf.path for leaf in r.bad_leaves] == ["['K']"]
    assert r.leaf("['K']").pattern == "sign"  # fitted on the smooth entries


def test_abs_kink_with_wrong_subgradient_is_a_mismatch():
    loss = lambda p: jnp.sum(jnp.abs(p))
    p = np.array([0.0, 1.0, -2.0])
    assert jgc.check_grad(loss, p, grad=lambda p: np.sign(p)).ok  # 0 at 0: inside [-1, 1]
    r = jgc.check_grad(loss, p, grad=lambda p: np.where(p == 0, 3.0, np.sign(p)))
    assert not r.ok and r.leaf("").n_mismatch == 1 and r.leaf("").worst_index == (0,)


@pytest.mark.parametrize("xp", [jnp, np])
def test_dropout_with_key_argument_is_an_ordinary_loss(xp):
    ex = dropout(xp=xp)
    assert jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad).ok
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["mask_not_scaled"].grad)
    assert r.leaf("['W1']").factor == pytest.approx(0.8)


def test_zero_gradient_pattern():
    ex = ALL["softmax_l2"]()
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["db_never_computed"].grad)
    assert r.leaf("['b']").pattern == "zero"
    assert "is all zeros" in r.diagnosis


def test_noisy_float64_loss_gives_no_false_alarm():
    """A loss computed in float32 inside a float64 check: its noise is measured, not assumed."""
    ex = mlp("tanh")

    def loss(p, X, Y):
        p32 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), p)
        return ex.loss(p32, X.astype(jnp.float32), Y.astype(jnp.float32)).astype(jnp.float64)

    r = jgc.check_grad(loss, ex.params, *ex.args, grad=ex.grad)
    assert r.ok, str(r)
    assert r.noise > 1e-9  # float32-level noise, measured
    r = jgc.check_grad(loss, ex.params, *ex.args, grad=ex.bugs["b1_4_over_m"].grad)
    assert [leaf.path for leaf in r.bad_leaves] == ["['b1']"]


def test_ecnoise_recovers_a_known_noise_level():
    rng = np.random.default_rng(0)
    for sigma in (1e-3, 1e-8, 1e-14):
        estimates = []
        for _ in range(50):
            t = np.arange(9) * 1e-6
            f = 1.0 + 0.3 * t + 2 * t ** 2 + rng.normal(scale=sigma, size=9)
            estimates.append(dq.ecnoise(f))
        est = np.median([e for e in estimates if e is not None])
        assert sigma / 2 < est < 2 * sigma
    assert dq.ecnoise(np.full(9, 1.0)) is None  # no noise visible at all


def test_richardson_gives_more_digits_in_float32():
    ex = mlp("tanh")
    p, args = _f32(ex.params), _f32(ex.args)
    truth = ex.grad(ex.params | {k: np.asarray(v, np.float64) for k, v in p.items()},
                    *[np.asarray(a, np.float64) for a in args])
    err = {}
    for method in ("central", "richardson"):
        g = jgc.numerical_grad(ex.loss, p, *args, x64=False, method=method)
        err[method] = np.median([np.median(np.abs(g[k] - truth[k]) / np.abs(truth[k]))
                                 for k in g])
    assert err["richardson"] < err["central"] / 3
    r = jgc.check_grad(ex.loss, p, *args, grad=ex.grad, x64=False, method="richardson")
    assert r.ok and r.method.startswith("Richardson")
    n = r.n_params
    assert r.n_evaluations >= 6 * n  # its cost: h, 2h and 4h on both sides


def test_rtol_atol_override_the_error_model():
    ex = mlp("tanh")
    bad = ex.bugs["b1_4_over_m"].grad
    assert jgc.check_grad(ex.loss, ex.params, *ex.args, grad=bad, rtol=10.0).ok
    assert not jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, atol=0.0,
                              rtol=1e-14).ok


def test_float16_params_are_promoted():
    loss = lambda p: jnp.sum(jnp.sin(p["w"].astype(jnp.float32)))
    p = {"w": np.linspace(-1, 1, 6).astype(np.float16)}
    r = jgc.check_grad(loss, p, grad=lambda p: {"w": np.cos(p["w"])}, x64=False)
    assert r.precision == "float32" and r.ok
    assert "['w'] is half precision: evaluated in float32" in r.notes[0]


def test_coarse_resolution_is_reported_not_hidden():
    """A leaf whose gradient is small next to the loss: in float32, 1% of it is below noise.
    jgc says how small an error it could have missed, and how to see it."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"])) + 1e-3 * jnp.sum(jnp.sin(p["tiny"]))
    p = {"w": rng.normal(size=4).astype(np.float32), "tiny": np.ones(3, np.float32)}
    r = jgc.check_grad(loss, p, x, x64=False)
    tiny, w = r.leaf("['tiny']"), r.leaf("['w']")
    assert r.ok and 1 > tiny.resolution > 0.01 > w.resolution
    assert "Resolution: the finite differences' error bar" in r.diagnosis
    assert "is large next to the gradient of ['tiny']" in r.diagnosis
    assert "check in float64 (x64=True)" in r.diagnosis
    r64 = jgc.check_grad(loss, p, x)
    assert r64.leaf("['tiny']").resolution < 1e-4 and "Resolution" not in r64.diagnosis


def test_leaf_below_resolution_is_unresolved_not_ok():
    """Ten times smaller, float32 noise swamps the tiny leaf's gradient: a 2x bug there would
    pass unseen, so the leaf is unresolved and the check is not ok."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"])) + 1e-4 * jnp.sum(jnp.sin(p["tiny"]))
    p = {"w": rng.normal(size=4).astype(np.float32), "tiny": np.ones(3, np.float32)}
    r = jgc.check_grad(loss, p, x, x64=False)
    assert not r.ok and r.verdict == "unresolved"
    assert r.leaf("['tiny']").status == "unresolved" and r.leaf("['w']").status == "ok"
    assert "UNRESOLVED (resolution ≥100%)" in str(r)
    assert "Unresolved: finite differences cannot resolve the gradient of ['tiny']" in r.diagnosis
    assert jgc.check_grad(loss, p, x).ok  # float64 resolves it
