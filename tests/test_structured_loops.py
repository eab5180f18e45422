"""The structured pass through loops (structured/loops.py: `lax.scan` carried as slabs, the
contraction of two perturbed operands, `split`) and the max over a perturbed axis
(rules._reduce_extreme), against the dense path, as tests/test_structured.py tests the other
rules. The tolerance is that module's (REORDER: sums reordered, see its docstring); a max is
exact, so the max rule is compared bit for bit where nothing but maxima follows the perturbed
sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_structured import _evaluators, assert_agree, structured_and_dense

import jgc
from jgc._src.compat import enable_x64
from jgc.examples import zoo

F64 = np.float64
NO_SPREAD = ("scan", "dot_general", "split", "reduce_max")  # must never reach the fallback


def _lstm(**kw):
    model = zoo.lstm_scan(**kw)
    params = {k: np.asarray(v, F64) for k, v in model.params.items()}
    return model, params, tuple(np.asarray(a, F64) for a in model.args)


@pytest.mark.parametrize("leaf", ["Wx", "Wh", "b", "Wo"])
def test_lstm_every_leaf_agrees_with_dense(leaf):
    """Wh is a one-hot const of the scan and the carry is dense from the first step (the
    two-slab contraction); Wx and b enter through a const too, Wo after the loop."""
    model, p, (X, Y) = _lstm(d=3, h=4, T=5, m=2)
    plan = assert_agree(lambda w: model.loss({**p, leaf: w}, X, Y), p[leaf], F64,
                        structural=NO_SPREAD)
    assert not plan.fallbacks, plan.fallbacks


RNG = np.random.default_rng(11)
A, B, XS = RNG.normal(size=(3, 3)), RNG.normal(size=(2, 3)), RNG.normal(size=(4, 2))


def _reverse(w):
    """A reverse scan with a perturbed const, whose ys are read too (their order is xs')."""
    def body(h, x):
        h = jnp.tanh(h @ w + x @ B)
        return h, h * x[0]

    h, ys = lax.scan(body, jnp.ones(3, w.dtype), XS.astype(w.dtype), reverse=True)
    return jnp.concatenate([h, jnp.sum(ys * jnp.arange(4.0)[:, None], 0)])


def _perturbed_xs(w):
    """xs computed from the leaf (dense, sliced per step); the consts are not perturbed."""
    xs = jnp.sin(XS.astype(w.dtype) @ w)  # (4, 3)

    def body(h, x):
        return jnp.tanh(h @ A + x), jnp.sum(h * x)

    h, ys = lax.scan(body, jnp.zeros(3, w.dtype), xs)
    return jnp.concatenate([h, ys])


def _init_only(w):
    """The leaf enters only the carry's initial value."""
    def body(h, x):
        return jnp.tanh(h @ A) + x[0], None

    h, _ = lax.scan(body, jnp.cos(w[0]), XS.astype(w.dtype))
    return h


def _mixed(w):
    """Three consts (one perturbed), four carries: a counter and a passthrough the
    perturbation never reaches, one it reaches only from the second step (through another
    carry: the fixed point), and one it reaches at once; ys both perturbed and not."""
    def body(carry, x):
        n, keep, late, early = carry
        new_early = jnp.tanh(early @ w + x @ B)
        new_late = late * 0.5 + jnp.sum(early)
        return (n + 1.0, keep, new_late, new_early), (n * 2.0, new_late * x[1])

    init = (jnp.zeros((), w.dtype), jnp.ones(2, w.dtype), jnp.zeros((), w.dtype),
            jnp.ones(3, w.dtype))
    (n, keep, late, early), (ya, yb) = lax.scan(body, init, XS.astype(w.dtype))
    return jnp.concatenate([n[None], keep, late[None], early, ya, yb])


def _nested(w):
    """A scan in a scan's body, the perturbed const closed over by both."""
    def inner(h, x):
        return jnp.tanh(h @ w) + x, None

    def outer(h, x):
        h, _ = lax.scan(inner, h, jnp.stack([x, -x]))
        return h, jnp.sum(h)

    h, ys = lax.scan(outer, jnp.ones(3, w.dtype), (XS @ B).astype(w.dtype))
    return jnp.concatenate([h, ys])


def _no_xs(w):
    """xs=None with a length (the scan has no xs at all)."""
    h, ys = lax.scan(lambda h, _: (jnp.tanh(h @ w), jnp.sum(h)), jnp.ones(3, w.dtype), None,
                     length=5)
    return jnp.concatenate([h, ys])


@pytest.mark.parametrize("f", [_reverse, _perturbed_xs, _init_only, _mixed, _nested, _no_xs],
                         ids=lambda f: f.__name__.strip("_"))
def test_scan_variants_agree_with_dense(f):
    w = RNG.normal(size=(2, 3) if f is _perturbed_xs else (3, 3)) * 0.7
    plan = assert_agree(f, w, F64, structural=NO_SPREAD)
    assert not plan.fallbacks, plan.fallbacks


def test_scan_with_an_unperturbed_result_is_left_alone():
    """A scan the perturbation reaches, but none of whose outputs depends on it."""
    def f(w):
        def body(h, x):
            return h * 0.5 + x[0], None
        h, _ = lax.scan(lambda h, x: body(h, x + 0.0 * jnp.sum(w)), jnp.ones(3, w.dtype),
                        XS.astype(w.dtype))
        return h + jnp.sum(w ** 2)
    assert_agree(f, RNG.normal(size=(3, 3)), F64)


# -- the max over a perturbed axis ------------------------------------------------------------

def _tied_logits():
    """Logits with a tie for the max in every row (classes 1 and 3 equal), and rows whose
    largest entry is each class in turn."""
    z = RNG.normal(size=(6, 5))
    z[:, 3] = z[:, 1]
    z[np.arange(5), np.arange(5)] += 3.0  # row r's max at class r, tied for r = 1 and 3
    z[5, 1] = z[5, 3] = 9.0
    return z


@pytest.mark.parametrize("seed", range(4))
def test_max_over_the_perturbed_axis_is_exact(seed):
    """The bias of the classes perturbed one at a time, with steps of both signs: at the
    argmax, at a tied maximum, and elsewhere. Nothing but a max follows the perturbed sum, so
    structured and dense agree bit for bit; both max and min."""
    z = _tied_logits()

    def f(b):
        y = z.astype(b.dtype) + b[None, :]
        return jnp.concatenate([jnp.max(y, axis=1), jnp.min(y, axis=1),
                                jnp.max(y, axis=(0, 1))[None]])

    got, want, plan = structured_and_dense(f, np.zeros(5), F64, seed=seed)
    np.testing.assert_array_equal(got, want)
    assert "reduce_max" not in plan.fallbacks and "reduce_min" not in plan.fallbacks


@pytest.mark.parametrize("seed", range(2))
def test_log_softmax_last_bias_stays_structured(seed):
    """The MLP's last bias through log-softmax (its max over the classes, then a sum over
    them): values agree with dense to rounding, with the same tied logits (the last layer's
    columns 1 and 3 equal), and no operation falls back."""
    model = zoo.mlp((6, 5, 4), batch=6)
    p = dict(model.params)
    p["W1"] = p["W1"].copy()
    p["W1"][:, 3] = p["W1"][:, 1]
    p["b1"] = p["b1"].copy()
    p["b1"][3] = p["b1"][1]
    plan = assert_agree(lambda b: model.loss({**p, "b1": b}, *model.args), p["b1"], F64,
                        structural=NO_SPREAD, seed=seed)
    assert not plan.fallbacks, plan.fallbacks


def test_cnn_last_bias_is_structured_through_log_softmax():
    """The Flax CNN's last bias: before the max rule, log-softmax's max sent it dense; now its
    only fallback is the gather by labels."""
    sp, _, s, _ = _evaluators(zoo.flax_cnn("mnist"), True)
    with enable_x64(True):
        s._setup()
    bias = {sp.checked_specs()[k].path: p for k, p in s.plans.items()}["['Dense_1']['bias']"]
    assert bias.use and bias.fallbacks == ("gather",), bias.fallbacks


# -- the plan and real checks ---------------------------------------------------------------

def test_lstm_takes_the_structured_pass_and_says_so():
    model, p, args = _lstm(d=16, h=64, T=8, m=4)
    r = jgc.check_grad(model.loss, p, *args, mode="sample", samples=8, progress=False)
    assert r.ok, str(r)
    note = next(n for n in r.notes if "structured evaluation" in n)
    for leaf in ("['Wh']", "['Wx']", "['b']"):
        assert leaf in note.split("dense evaluation")[0], note


def test_lstm_check_names_a_planted_wrong_entry():
    """A full check through the scan rule: ok with the true gradient, and one wrong entry of
    Wh named at its index."""
    model, p, args = _lstm(d=16, h=64, T=4, m=4)  # 21,632 parameters: over STRUCTURED_MIN
    with enable_x64(True):
        grad = jax.jit(jax.grad(model.loss))

        def wrong(q, *a):
            g = jax.tree.map(np.array, grad(q, *a))
            g["Wh"][5, 17] *= 1.003
            return g

        ok = jgc.check_grad(model.loss, p, *args, mode="full", progress=False)
        bad = jgc.check_grad(model.loss, p, *args, grad=wrong, mode="full", progress=False)
    assert ok.ok and any("structured evaluation" in n for n in ok.notes), str(ok)
    assert [b.path for b in bad.bad_leaves] == ["['Wh']"], str(bad)
    assert bad.bad_leaves[0].worst_index == (5, 17)


def test_lstm_model_agrees_through_the_evaluator():
    """The evaluators' own path (chunks, the base pass), as the benchmark-model test does."""
    sp, plan, s, d = _evaluators(zoo.lstm_scan(d=5, h=8, T=4, m=3), True)
    rng = np.random.default_rng(7)
    index = np.concatenate([rng.integers(sp.offsets[k], sp.offsets[k + 1], 16)
                            for k in range(len(sp.checked))])
    step = rng.choice([-1, 1], len(index)) * 10.0 ** rng.uniform(-4, -2, len(index))
    with enable_x64(True):
        a, b, f0 = s.perturbed(index, step), d.perturbed(index, step), d.at()
    # The losses are means of O(1) terms summed in different orders (test_structured's bound).
    assert np.max(np.abs(a - b)) <= 16 * 2.0 ** -52 * max(1.0, abs(f0))
    assert not s.failed, s.failed
