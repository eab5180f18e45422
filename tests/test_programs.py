"""Compiled programs are reused only for the same program: a rebuilt loss, a rebuilt jitted
gradient and every kind of nested jaxpr are seen as they are at call time, and an unchanged loss
compiles nothing (the positive control of each case)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.compat import enable_x64
from jgc._src.evaluators import programs

RNG = np.random.default_rng(7)
W = RNG.normal(size=(4, 3))
X1, X2 = RNG.normal(size=(5, 4)), RNG.normal(size=(5, 4))


def _grad_for(X):
    """The right gradient of sum(tanh(X @ p)**2), by hand (NumPy)."""
    def grad(p):
        t = np.tanh(X @ p)
        return X.T @ (2 * t * (1 - t ** 2))
    return grad


# Each builder returns a loss of p that reads X only through a jitted helper closing over it,
# inside one kind of nested jaxpr: the helper's closed jaxpr holds X as a constant.
def _jit_closure(X):
    return jax.jit(lambda p: jnp.sum(jnp.tanh(X @ p) ** 2))


def _helper(X):
    h = jax.jit(lambda p: X @ p)
    return lambda p: jnp.sum(jnp.tanh(h(p)) ** 2)


def _custom_jvp(X):
    h = jax.jit(lambda p: X @ p)

    @jax.custom_jvp
    def f(p):
        return jnp.sum(jnp.tanh(h(p)) ** 2)

    @f.defjvp
    def f_jvp(primals, tangents):
        (p,), (t,) = primals, tangents
        z = jnp.tanh(h(p))
        return f(p), jnp.sum(2 * z * (1 - z ** 2) * h(t))

    return f


def _custom_vjp(X):
    h = jax.jit(lambda p: X @ p)

    @jax.custom_vjp
    def f(p):
        return jnp.sum(jnp.tanh(h(p)) ** 2)

    def fwd(p):
        return f(p), jnp.tanh(h(p))

    def bwd(z, g):
        return (g * X.T @ (2 * z * (1 - z ** 2)),)

    f.defvjp(fwd, bwd)
    return f


def _scan(X):
    h = jax.jit(lambda p: X @ p)
    return lambda p: jax.lax.scan(lambda c, _: (c + jnp.sum(jnp.tanh(h(p)) ** 2), None), 0.0,
                                  None, length=1)[0]


def _cond(X):
    h = jax.jit(lambda p: X @ p)
    return lambda p: jax.lax.cond(True, lambda p: jnp.sum(jnp.tanh(h(p)) ** 2),
                                  lambda p: 0.0 * jnp.sum(p), p)


def _while(X):
    h = jax.jit(lambda p: X @ p)

    def loss(p):
        body = lambda c: (c[0] + 1, c[1] + jnp.sum(jnp.tanh(h(p)) ** 2))
        return jax.lax.while_loop(lambda c: c[0] < 1, body, (0, 0.0))[1]
    return loss


def _checkpoint(X):
    h = jax.jit(lambda p: X @ p)
    return lambda p: jax.checkpoint(lambda p: jnp.sum(jnp.tanh(h(p)) ** 2))(p)


NESTINGS = {"jit": _jit_closure, "jitted helper": _helper, "custom_jvp": _custom_jvp,
            "custom_vjp": _custom_vjp, "scan": _scan, "cond": _cond, "while": _while,
            "checkpoint": _checkpoint}


@pytest.mark.parametrize("nesting", NESTINGS)
def test_a_rebuilt_loss_is_a_new_program_in_every_nesting(nesting):
    make = NESTINGS[nesting]
    first = make(X1)
    assert jgc.check_grad(first, W, grad=_grad_for(X1)).ok
    before = programs.CACHE.compiles
    # The positive control: the same function again compiles nothing, so what follows is not
    # passing merely because nothing is ever reused. (Rebuilt from the same array it would
    # compile again where it holds a custom rule: a new rule function is a new program.)
    assert jgc.check_grad(first, W * 0.5, grad=_grad_for(X1)).ok
    assert programs.CACHE.compiles == before
    new = make(X2)
    right = jgc.check_grad(new, W, grad=_grad_for(X2))
    stale = jgc.check_grad(new, W, grad=_grad_for(X1))
    assert right.ok, str(right)
    assert not stale.ok and stale.verdict == "wrong_gradient", str(stale)
    np.testing.assert_allclose(jgc.numerical_grad(new, W), _grad_for(X2)(W), rtol=1e-7)
    if nesting != "while":  # reverse mode cannot differentiate a while loop
        # jax.grad (grad=None) of the rebuilt loss is its own, not the first one's.
        assert jgc.check_grad(new, W).ok


def test_a_rebuilt_jitted_gradient_function_is_seen():
    loss = lambda p, X: jnp.sum(jnp.tanh(X @ p) ** 2)

    def make_grad(X):
        def grad(p, _):
            t = jnp.tanh(X @ p)
            return X.T @ (2 * t * (1 - t ** 2))
        return jax.jit(grad)

    assert jgc.check_grad(loss, W, X1, grad=make_grad(X1)).ok
    before = programs.CACHE.compiles
    assert jgc.check_grad(loss, W, X1, grad=make_grad(X1)).ok
    assert programs.CACHE.compiles == before
    r = jgc.check_grad(loss, W, X1, grad=make_grad(X2))
    assert not r.ok and r.verdict == "wrong_gradient", str(r)


def test_a_rebuilt_jitted_rule_is_seen_by_check_vjp_jvp_and_hvp():
    f = lambda x, w: jnp.tanh(x @ w)

    def make_vjp(scale):
        s = jnp.asarray(scale)
        return jax.jit(lambda dy, x, w: jax.vjp(f, x, w)[1](dy * s))

    primals = (X1, W)
    assert jgc.check_vjp(f, make_vjp(1.0), primals).ok
    assert not jgc.check_vjp(f, make_vjp(2.0), primals).ok

    def make_jvp(scale):
        s = jnp.asarray(scale)
        return jax.jit(lambda p, t: (f(*p), s * jax.jvp(f, p, t)[1]))

    assert jgc.check_jvp(f, make_jvp(1.0), primals).ok
    assert not jgc.check_jvp(f, make_jvp(2.0), primals).ok

    loss = lambda p: jnp.sum(jnp.tanh(X1 @ p) ** 2)

    def make_hvp(scale):
        s = jnp.asarray(scale)
        return jax.jit(lambda p, v: s * jax.jvp(jax.grad(loss), (p,), (v,))[1])

    assert jgc.check_hvp(loss, W, hvp=make_hvp(1.0)).ok
    assert not jgc.check_hvp(loss, W, hvp=make_hvp(2.0)).ok


def test_constants_inside_nested_jaxprs_are_keyed_by_content():
    """The key is what makes reuse safe: equal for equal content, different for any changed
    byte, and None (never reuse) for a constant whose content cannot be read."""
    a = np.arange(6.0).reshape(2, 3)
    b = a.copy()
    b[1, 2] = np.nextafter(b[1, 2], np.inf)  # one ulp
    trace = lambda X: programs.trace(lambda p: jnp.sum(jax.jit(lambda p: X @ p)(p)),
                                     jax.ShapeDtypeStruct((3,), np.float64))
    with enable_x64(True):  # the constant stays float64, so one ulp is a different program
        assert trace(a).key == trace(a.copy()).key
        assert trace(a).key != trace(b).key
    assert programs._digest(object()) is None
    key = jax.random.key(0)
    assert programs._digest(key) is not None and programs._digest(key) == programs._digest(
        jax.random.key(0)) != programs._digest(jax.random.key(1))


# -- a custom_jvp rule that closes over a value of the tracing pass ------------------------------

def test_expn_with_an_array_order_is_checked():
    """jax.scipy.special.expn's custom_jvp takes the order as a nondiff argument: the traced
    order lives in the rule's closure, where it is a dead tracer once the trace has ended."""
    x = np.array([0.5, 1.0, 2.0])
    loss = lambda x: jnp.sum(jax.scipy.special.expn(jnp.asarray(2), x))
    r = jgc.check_grad(loss, x)
    assert r.ok, str(r)
    assert jgc.check_jvp(lambda x: jax.scipy.special.expn(jnp.asarray(2), x), None, (x,)).ok
    # JAX itself cannot differentiate it twice (jax.hessian raises the same error): a refusal
    # that says so, not a crash.
    with pytest.raises(jgc.InputError, match="hvp=None checks jax's Hessian-vector product"):
        jgc.check_hvp(loss, x)


def _power_rule(wrong: float):
    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def power(n, x):
        return x ** n

    @power.defjvp
    def power_jvp(n, primals, tangents):
        (x,), (t,) = primals, tangents
        return power(n, x), wrong * n * x ** (n - 1) * t

    return power


@pytest.mark.parametrize("wrong", [1.0, 2.0])
def test_a_nondiff_argnums_rule_closing_over_a_traced_array(wrong):
    power = _power_rule(wrong)
    loss = lambda x: jnp.sum(power(jnp.asarray(3.0), x))
    x = np.array([0.5, 1.5, -2.0])
    r = jgc.check_grad(loss, x)
    assert r.ok == (wrong == 1.0), str(r)
    if wrong != 1.0:
        assert r.leaves[0].pattern == "scale" and r.leaves[0].factor == pytest.approx(2.0)
    before = programs.CACHE.compiles
    assert jgc.check_grad(loss, x).ok == (wrong == 1.0)
    assert programs.CACHE.compiles == before
