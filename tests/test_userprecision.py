"""The user's own precision: a float32 model checked in float64 (x64=True, the default) also has
its gradient evaluated once in float32, and what only fails there is reported, not hidden."""

import jax.numpy as jnp
import numpy as np
import pytest

import jgc

X100 = np.array([100.0, 1.0, -3.0], np.float32)


def overflow_loss(x):
    """Right in float64; in float32 exp(100) overflows in the branch `where` discards, and its
    gradient, inf * 0, is NaN."""
    return jnp.sum(jnp.where(x < 50, jnp.exp(x), 0.0))


def test_a_nan_only_in_float32_is_reported_not_hidden():
    r = jgc.check_grad(overflow_loss, X100)
    assert not r.ok and r.verdict == "precision", str(r)
    leaf = r.leaves[0]
    assert leaf.status == "precision" and leaf.own_dtype == "float32"
    assert leaf.own_n_nonfinite == 1 and leaf.own_worst[0] == (0,)
    assert leaf.own_worst[1] == 0.0 and np.isnan(leaf.own_worst[2])
    assert r.summary == "1 of 1 checked leaves fail in float32"
    assert str(r).startswith("jgc gradient check: WRONG AT YOUR PRECISION")
    assert ("jax.grad is right in float64 but not in float32, the precision your model runs "
            "in, in <params>:") in r.diagnosis
    assert "1 non-finite entry, worst at (0,): nan in float32 where float64 gives 0" in \
        r.diagnosis
    assert "double-where" in r.diagnosis and "keep x64=True" not in r.diagnosis
    d = r.to_dict()
    assert d["verdict"] == "precision" and d["leaves"][0]["own_worst"][0] == [0]
    assert "PRECISION (in float32: 1/3)" in r._repr_html_()
    with pytest.raises(AssertionError, match=r"\[jgc\] gradient check failed \(precision\)"):
        jgc.assert_grad(overflow_loss, X100)


def test_where_the_gradient_is_right_in_float32_nothing_is_reported():
    x = np.array([10.0, 1.0, -3.0], np.float32)
    r = jgc.check_grad(overflow_loss, x)
    assert r.ok and r.leaves[0].own_dtype is None, str(r)
    # float64 parameters are the user's own precision: nothing to evaluate again.
    r64 = jgc.check_grad(overflow_loss, X100.astype(np.float64))
    assert r64.ok and r64.leaves[0].own_dtype is None
    # x64=False already checks at the user's precision: the NaN is a plain mismatch there.
    r32 = jgc.check_grad(overflow_loss, X100, x64=False)
    assert r32.verdict == "wrong_gradient" and r32.leaves[0].pattern == "nonfinite"


def test_a_hand_written_gradient_is_judged_at_its_own_precision_and_jax_grad_triaged():
    def same_bug(x):  # the same float32 overflow, hand-written in JAX
        finite = jnp.isfinite(jnp.exp(x)).astype(x.dtype)
        return jnp.where(x < 50, jnp.exp(x), 0.0) * finite / finite

    r = jgc.check_grad(overflow_loss, X100, grad=same_bug)
    assert r.verdict == "precision", str(r)
    assert "jax.grad fails there too, so the loss's own float32 computation is the cause" in \
        r.diagnosis

    def guarded(x):  # the double-where trick: right in float32 too
        safe = jnp.where(x < 50, x, 0.0)
        return jnp.where(x < 50, jnp.exp(safe), 0.0)

    r = jgc.check_grad(overflow_loss, X100, grad=guarded)
    assert r.ok, str(r)

    def guarded_loss(x):
        return jnp.sum(jnp.where(x < 50, jnp.exp(jnp.where(x < 50, x, 0.0)), 0.0))

    assert jgc.check_grad(guarded_loss, X100).ok


def test_cancellation_that_loses_half_of_float32s_digits_is_reported():
    """The variance as E[x**2] - E[x]**2: its gradient 2 (x - mean) / n is a difference of
    terms 1e6 times larger, which float32 cannot resolve."""
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.normal(size=8)).astype(np.float32)
    loss = lambda x: jnp.mean(x ** 2) - jnp.mean(x) ** 2
    r = jgc.check_grad(loss, x)
    assert r.verdict == "precision", str(r)
    leaf = r.leaves[0]
    assert leaf.own_n_nonfinite == 0 and leaf.own_n_bad >= 1
    assert "off by more than half of float32's digits" in r.diagnosis
    # The two-pass form, as one would write it for float32, passes.
    assert jgc.check_grad(lambda x: jnp.mean((x - jnp.mean(x)) ** 2), x).ok


def test_float32_data_promoted_with_float64_parameters_counts_too():
    X = np.array([[100.0], [1.0]], np.float32)
    loss = lambda w, X: jnp.sum(jnp.where(X * w[None, :] < 50, jnp.exp(X * w[None, :]), 0.0))
    r = jgc.check_grad(loss, np.array([1.0]), X)
    # Without x64 enabled, the user's JAX runs float64 parameters in float32 too.
    assert r.verdict == "precision" and r.leaves[0].own_dtype == "float32", str(r)


def test_check_vjp_judges_the_backward_at_the_primals_precision():
    f = lambda x: jnp.where(x < 50, jnp.exp(x), 0.0)
    r = jgc.check_vjp(f, None, (X100,))
    assert r.verdict == "precision" and r.leaves[0].status == "precision", str(r)
    x = np.array([10.0, 1.0, -3.0], np.float32)
    assert jgc.check_vjp(f, None, (x,)).ok


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_half_precision_parameters_are_judged_at_their_resolution(dtype):
    x = jnp.asarray([0.5, -1.25, 2.0], dtype)
    loss = lambda x: jnp.sum(jnp.tanh(x) ** 2)
    r = jgc.check_grad(loss, x)
    assert r.ok, str(r)
    hand = lambda x: (2 * jnp.tanh(x) * (1 - jnp.tanh(x) ** 2)).astype(dtype)
    assert jgc.check_grad(loss, x, grad=hand).ok
    wrong = lambda x: (4 * jnp.tanh(x) * (1 - jnp.tanh(x) ** 2)).astype(dtype)
    bad = jgc.check_grad(loss, x, grad=wrong)
    assert not bad.ok and bad.leaves[0].pattern == "scale"
    assert bad.leaves[0].factor == pytest.approx(2.0, rel=0.02)


def test_a_gradient_that_fails_at_the_users_precision_is_said_so():
    """The comparison at the user's own precision is skipped only with a note naming why."""
    def grad(x):
        if x.dtype == np.float32:
            raise RuntimeError("no float32 kernel")
        return np.exp(x)

    x = np.array([0.5, 1.0], np.float32)
    r = jgc.check_grad(lambda x: jnp.sum(jnp.exp(x)), x, grad=grad)
    assert r.ok, str(r)
    assert any("not compared at your own precision (float32)" in n and "no float32 kernel" in n
               for n in r.notes), r.notes


def test_complex_step_on_a_sample_of_a_large_leaf():
    rng = np.random.default_rng(0)
    p = {"W": rng.normal(size=(200, 120)) * 0.1, "b": np.zeros(120)}
    X = rng.normal(size=(8, 200))
    # X cast to the parameters' dtype: complex under the complex step (strict promotion)
    loss = lambda p, X: jnp.sum(jnp.tanh(X.astype(p["W"].dtype) @ p["W"] + p["b"][None]) ** 2)
    assert jgc.check_grad(loss, p, X, method="complex", mode="sample").ok


def test_a_loss_that_draws_by_dtype_is_not_compared_across_precisions():
    """jax.random.normal draws different numbers in float32 and float64, so the loss at the
    user's precision is another function: its gradient differs for that reason alone. Nothing is
    blamed, and a note says why only non-finite entries were looked for."""
    import jax

    def loss(p, key):
        return jnp.sum(jnp.tanh(p["w"]) * jax.random.normal(key, (3,)))

    report = jgc.check_grad(loss, {"w": jnp.ones(3, jnp.float32)}, jax.random.key(0))
    assert report.ok and report.verdict == "ok", report
    assert any("different functions" in n and "draws random numbers" in n for n in report.notes)
    # A NaN at that precision is still found, draws or not.
    def masked(p, key):
        x = p["w"] * 100.0
        return jnp.sum(jnp.where(x < 50, jnp.exp(x), 0.0) * jax.random.uniform(key, (3,)))

    report = jgc.check_grad(masked, {"w": jnp.ones(3, jnp.float32)}, jax.random.key(0))
    assert report.verdict == "precision", report
