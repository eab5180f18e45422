"""Localisation (issue 23): the wrong rule named with its function, its line and its input.

Every bug here is planted in a real rule, and every expected line is read from this file (never
written down), so the tests say exactly which function and line jgc must name.
"""

import inspect
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.localize import audit
from jgc._src.localize import equations as eq

HERE = __file__.replace("\\", "/").rsplit("/", 1)[-1]


def line_of(fn) -> int:
    """The line jax names a rule function by: its code's first line (the decorator's)."""
    return inspect.unwrap(fn).__code__.co_firstlineno


def line_with(fn, marker: str) -> int:
    """The line of `fn`'s source that holds `marker` (a comment at a call site)."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if marker in text)


def x64(a):
    return jnp.asarray(np.asarray(a, np.float64))


# -- planted rules -------------------------------------------------------------------------

@jax.custom_jvp
def sin2(x):
    return jnp.sin(x)


@sin2.defjvp
def sin2_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sin(x), 2.0 * jnp.cos(x) * t  # the bug: 2x


@jax.custom_vjp
def tanh_neg(x):
    return jnp.tanh(x)


def tanh_neg_fwd(x):
    y = jnp.tanh(x)
    return y, y


def tanh_neg_bwd(y, g):
    return (-g * (1.0 - y * y),)  # the bug: the sign


tanh_neg.defvjp(tanh_neg_fwd, tanh_neg_bwd)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def power(x, n):
    return x ** n


@power.defjvp
def power_jvp(n, primals, tangents):
    (x,), (t,) = primals, tangents
    return x ** n, n * x ** (n - 1) * t * 3.0  # the bug: 3x


@jax.custom_jvp
def softplus_hi(x):
    return jnp.logaddexp(x, 0.0)


@softplus_hi.defjvp
def softplus_hi_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    slope = jax.nn.sigmoid(x)
    return softplus_hi(x), jnp.where(x > 2.0, 2.0 * slope, slope) * t  # wrong above 2


def sin2_loss(p):
    return jnp.sum(sin2(p["w"]) * p["v"])  # sin2 call


def test_custom_jvp_named_with_rule_line_call_line_and_factor():
    p = {"w": x64([0.3, -1.2, 2.0]), "v": x64([1.0, 2.0, -0.5])}
    r = jgc.check_rules(sin2_loss, p)
    assert not r.ok
    (row,) = r.wrong
    assert (row.kind, row.name, row.primal) == ("custom_jvp", "sin2_jvp", "sin2")
    assert row.rule_file.endswith(HERE) and row.rule_line == line_of(sin2_jvp)
    assert row.file.endswith(HERE) and row.line == line_with(sin2_loss, "# sin2 call")
    assert all(other.verdict == "ok" for other in r.rows if other is not row)
    f = r.finding
    assert f.found and f.name == "sin2_jvp" and f.pattern == "scale"
    assert f.factor == pytest.approx(2.0, rel=1e-6)
    assert f.inputs == ("input 0 (x)",)
    assert f.autodiff == pytest.approx(2 * f.numerical, rel=1e-6)


def test_custom_vjp_wrong_sign_through_check_grad():
    def loss(p, X):
        return jnp.mean(tanh_neg(X @ p["W"]) ** 2)  # tanh_neg call

    rng = np.random.default_rng(0)
    p, X = {"W": rng.normal(size=(3, 2))}, rng.normal(size=(4, 3))
    report = jgc.check_grad(loss, p, X)
    assert not report.ok
    f = report.rule
    assert f.found and (f.kind, f.name, f.primal) == ("custom_vjp", "tanh_neg_bwd", "tanh_neg")
    assert f.rule_line == line_of(tanh_neg_bwd) and f.rule_file.endswith(HERE)
    assert f.line == line_with(loss, "# tanh_neg call")
    assert f.pattern == "sign" and f.factor == -1.0
    assert f.autodiff == pytest.approx(-f.numerical, rel=1e-6)


def test_nondiff_argnums_rule():
    def loss(x):
        return jnp.sum(power(x, 3))  # power call

    r = jgc.check_rules(loss, x64([0.5, 1.5]))
    (row,) = r.wrong
    assert (row.name, row.primal, row.rule_line) == ("power_jvp", "power", line_of(power_jvp))
    assert row.line == line_with(loss, "# power call")
    assert r.finding.factor == pytest.approx(3.0, rel=1e-6)


def test_rule_inside_nested_jit_names_the_call_and_the_context():
    @jax.jit
    def inner(x):
        return sin2(x) * 2.0  # inner call

    @jax.jit
    def outer(x):
        return jnp.sum(inner(x) ** 2)

    report = jgc.check_grad(outer, x64([0.1, 0.7]))
    f = report.rule
    assert f.name == "sin2_jvp" and f.line == line_with(inner, "# inner call")
    assert [c.split()[-1] for c in f.context] == ["outer", "inner"]


def test_rule_inside_scan_names_the_first_wrong_iteration():
    def loss(x0):
        def step(c, _):
            c = softplus_hi(c) + 0.6  # scan call
            return c, c

        _, ys = jax.lax.scan(step, x0, None, length=8)
        return jnp.sum(ys)

    x0 = x64(0.2)
    # The carry grows past 2 at some iteration: the rule is wrong from there on.
    c, first = 0.2, None
    for t in range(8):
        if c > 2.0 and first is None:
            first = t
        c = float(np.logaddexp(c, 0.0)) + 0.6
    report = jgc.check_grad(loss, x0)
    f = report.rule
    assert f.name == "softplus_hi_jvp" and f.iteration == first
    assert f"scan iteration {first}" in f.context[-1]
    assert f.line == line_with(loss, "# scan call")
    assert f"in loop iteration {first}" in str(report)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rule_inside_cond_names_the_branch_taken(sign):
    def loss(x):
        return jax.lax.cond(jnp.sum(x) > 0, lambda x: jnp.sum(sin2(x)),  # cond call
                            lambda x: jnp.sum(jnp.sin(x)), x)

    report = jgc.check_grad(loss, x64([0.4, 0.3]) * sign)
    if sign < 0:  # the branch taken has no custom rule: jax.grad is right there
        assert report.ok and report.rule is None
        return
    f = report.rule
    assert f.name == "sin2_jvp" and f.branch == 1 and "cond branch 1" in f.context
    assert f.line == line_with(loss, "# cond call")


def test_piecewise_where_at_its_boundary():
    def loss(p, y):
        x = p["x"]
        return jnp.sum(jnp.where(x == 0.0, 0.0, x * jnp.log(y)))  # piecewise

    p, y = {"x": x64([0.0, 1.0])}, x64([2.0, 3.0])
    report = jgc.check_grad(loss, p, y)
    assert report.leaf("['x']").status == "mismatch"
    f = report.rule
    assert f.found and f.kind == "branch" and f.name == "eq" and f.pattern == "boundary"
    assert f.line == line_with(loss, "# piecewise") and f.inputs == ("input 0",)
    assert f.rule_line == line_with(loss, "# piecewise")  # the select it decides
    # Every rule in it is right: the audit agrees.
    assert jgc.check_rules(loss, p, y).ok


def test_logsumexp_zero_weight_named_in_jax_library_code():
    def loss(b, x):
        return jax.nn.logsumexp(x, b=b)  # logsumexp call

    b, x = x64([1.0, 0.0, 2.0]), x64([1.0, 2.0, 3.0])
    report = jgc.check_grad(loss, b, x)
    assert not report.ok
    f = report.rule
    assert f.kind == "branch" and f.name == "ne"
    assert f.line == line_with(loss, "# logsumexp call")
    assert f.library.startswith("logsumexp at jax/_src/")
    # jax.grad's 0 for the zero weight is wrong; finite differences give exp(x1) / sum b exp x
    expected = np.exp(2.0) / (np.exp(1.0) + 2 * np.exp(3.0))
    leaf = report.leaves[0]
    assert leaf.worst_index == (1,) and leaf.numerical == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name, f, args", [
    ("xlogy at x = 0", lambda x, y: jnp.sum(jax.scipy.special.xlogy(x, y)),
     ([0.0, 1.0], [2.0, 3.0])),
    ("logaddexp at a tie", lambda x, y: jnp.sum(jnp.logaddexp(x, y)), ([1.0, 2.0], [1.0, 3.0])),
    ("rem w.r.t. the divisor", lambda x, y: jnp.sum(jax.lax.rem(x, y)),
     ([5.3, 7.1], [2.0, 3.0])),
])
def test_jax_rules_that_are_right_in_this_jax(name, f, args):
    """The rules the issue names, at their special points: right in jax 0.10.2 (checked by
    hand: d/dy rem(x, y) = -trunc(x/y); xlogy'(0) = log y; logaddexp'(tie) = 1/2)."""
    r = jgc.check_rules(f, *map(x64, args))
    assert r.ok, (name, str(r))
    assert any(row.kind == "custom_jvp" for row in r.rows) or name.startswith("rem")


# -- correct models name nothing -------------------------------------------------------------

@jax.custom_vjp
def good_tanh(x):
    return jnp.tanh(x)


def _good_bwd(y, g):
    return (g * (1.0 - y * y),)


good_tanh.defvjp(tanh_neg_fwd, _good_bwd)  # the same forward as tanh_neg, a right backward


def mlp_loss(p, X, y):
    h = good_tanh(X @ p["W1"] + p["b1"][None, :])
    out = h @ p["W2"]
    return jnp.mean((out[:, 0] - y) ** 2)


def test_correct_mlp_names_nothing():
    rng = np.random.default_rng(1)
    p = {"W1": rng.normal(size=(4, 8)), "b1": rng.normal(size=8), "W2": rng.normal(size=(8, 1))}
    X, y = rng.normal(size=(5, 4)), rng.normal(size=5)
    r = jgc.check_rules(mlp_loss, p, X, y)
    assert r.ok and not r.wrong and r.finding is None
    assert {row.name for row in r.rows if row.kind == "custom_vjp"} == {"_good_bwd"}
    report = jgc.check_grad(mlp_loss, p, X, y)
    assert report.ok and report.rule is None


@pytest.mark.parametrize("name", ["lstm_scan", "attention", "norms"])
def test_zoo_models_have_no_wrong_rule(name):
    from jgc.examples import zoo

    model = getattr(zoo, name)()
    r = jgc.check_rules(model.loss, model.params, *model.args)
    assert not r.wrong, str(r)


def test_example_wrong_custom_vjp_is_localised():
    from jgc.examples import wrong_custom_vjp

    ex = wrong_custom_vjp()
    report = jgc.check_grad(ex.loss, ex.params, *ex.args)
    f = report.rule
    assert f.found and f.kind == "custom_vjp" and f.pattern == "scale"
    assert f.factor == pytest.approx(2.0, rel=1e-6)
    assert f.rule_file.endswith("jgc/examples/_nets.py")


# -- the report -----------------------------------------------------------------------------

def layer(w, x):
    return tanh_neg(x @ w)  # three calls deep


def block(p, x):
    return layer(p["w2"], jnp.tanh(x @ p["w1"]))


def model_loss(p, x):
    return jnp.mean(block(p, x) ** 2)


def test_three_calls_deep_in_text_html_and_json():
    rng = np.random.default_rng(2)
    p = {"w1": rng.normal(size=(4, 5)), "w2": rng.normal(size=(5, 3))}
    x = rng.normal(size=(6, 4))
    report = jgc.check_grad(model_loss, p, x)
    line = line_with(layer, "# three calls deep")
    text = str(report)
    assert ("wrong derivative rule: the custom_vjp backward rule `tanh_neg_bwd` of "
            "`tanh_neg`, called at ") in text
    assert f"{HERE}:{line}" in text and f"{HERE}:{line_of(tanh_neg_bwd)}" in text
    assert "autodiff has the wrong sign" in text
    calls = [("layer", line), ("block", line_with(block, "layer(")),
             ("model_loss", line_with(model_loss, "block("))]
    assert [(s.split(" (")[0], int(s.rstrip(")").rsplit(":", 1)[1]))
            for s in report.rule.stack] == calls
    assert all(HERE in s for s in report.rule.stack)
    assert "  call stack: layer (" in text
    d = json.loads(report.to_json())
    assert d["rule"]["name"] == "tanh_neg_bwd" and d["rule"]["line"] == line
    # Position 0; jax 0.7 also records the argument's name there ("input 0 (x)"), 0.10 does not.
    assert [i.split(" (")[0] for i in d["rule"]["inputs"]] == ["input 0"]
    assert "tanh_neg_bwd" in report._repr_html_()
    assert report.rule.seconds > 0 and report.rule.n_checked >= 1


def test_not_run_when_jax_grad_is_right():
    report = jgc.check_grad(lambda p: jnp.sum(jnp.sin(p) ** 2), x64([0.1, 0.2]),
                            grad=lambda p: 2 * jnp.sin(p) * jnp.cos(p) * 2.0)
    assert not report.ok and report.rule is None  # the hand-written gradient is wrong
    assert report.to_dict()["rule"] is None


def test_hand_written_gradient_with_wrong_autodiff_localises_too():
    def loss(x):
        return jnp.sum(sin2(x))

    report = jgc.check_grad(loss, x64([0.2, 0.4]), grad=lambda x: jnp.cos(x))
    assert report.ok  # the hand-written gradient is right; jax.grad is not
    assert report.rule is not None and report.rule.name == "sin2_jvp"


def test_localisation_failure_is_said_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(eq, "record", broken)
    report = jgc.check_grad(lambda x: jnp.sum(sin2(x)), x64([0.2]))
    assert not report.ok and not report.rule.found
    assert report.rule.summary == "localisation could not run: RuntimeError: boom"
    assert "rule localisation: localisation could not run" in str(report)


def test_nothing_found_is_said():
    f = audit.localize(jax.make_jaxpr(lambda x: jnp.sum(x ** 2))(x64([1.0])), [x64([1.0])],
                       [True])
    assert not f.found and f.summary == audit.NOTHING and f.n_checked == 2


# -- check_rules ----------------------------------------------------------------------------

def test_check_rules_table_and_json():
    r = jgc.check_rules(sin2_loss, {"w": x64([0.3]), "v": x64([1.0])})
    text = str(r)
    assert text.splitlines()[0].startswith("jgc rules check: WRONG (")
    assert "sin2_jvp (of sin2)" in text and f"{HERE}:{line_of(sin2_jvp)}" in text
    d = json.loads(r.to_json())
    assert d["ok"] is False and d["rows"][0]["verdict"] == "wrong"


def test_check_rules_counts_calls_per_site():
    def loss(x):
        def step(c, _):
            return jnp.sin(c) * 0.9, None

        c, _ = jax.lax.scan(step, x, None, length=5)
        return jnp.sum(c)

    r = jgc.check_rules(loss, x64([0.3, 0.5]))
    assert r.ok
    assert {row.name: row.calls for row in r.rows}["sin"] == 5


def test_check_rules_refuses_bad_input():
    with pytest.raises(jgc.InputError, match="must be a function"):
        jgc.check_rules(x64([1.0]), lambda x: x)
    with pytest.raises(jgc.InputError, match="no floating-point array"):
        jgc.check_rules(lambda n: n * 2, np.arange(3))
    with pytest.raises(jgc.InputError, match="tracing f"):
        jgc.check_rules(lambda x: float(x[0]), x64([1.0]))


def test_check_rules_restores_precision():
    before = jax.config.jax_enable_x64
    jgc.check_rules(lambda x: jnp.sum(jnp.exp(x)), np.ones(2, np.float32))
    assert jax.config.jax_enable_x64 == before


def test_overflow_is_said_not_blamed_on_a_rule():
    """jax's documentation's naive log1pexp at x = 100 in float32: exp overflows, jax.grad is
    NaN (0 times Inf in the chain rule), and no rule is wrong."""
    def loss(x):
        return jnp.sum(jnp.log(1.0 + jnp.exp(x)))

    r = jgc.check_rules(loss, np.array([100.0, 3.0], np.float32), x64=False)
    assert not r.ok and not r.wrong and r.note == audit.NOT_FINITE
    assert "jgc rules check: NOT FINITE" in str(r)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def clip_gradient(lo, hi, x):
    return x


def clip_gradient_fwd(lo, hi, x):
    return x, None


def clip_gradient_bwd(lo, hi, _, g):
    return (jnp.clip(g, lo, hi),)


clip_gradient.defvjp(clip_gradient_fwd, clip_gradient_bwd)


def test_documentation_clip_gradient_named():
    """jax's documentation's clip_gradient: a bwd rule that clips its cotangent, deliberately
    not the derivative; it shows only where the cotangent is large, so jgc also checks a
    custom_vjp with the cotangent scaled (a right VJP is linear in it)."""
    def loss(x):
        return jnp.sum(jnp.sin(clip_gradient(-0.75, 0.75, x)) * 3.0)  # clipped

    report = jgc.check_grad(loss, x64([0.1, 2.0]))
    f = report.rule
    assert (f.name, f.rule_line) == ("clip_gradient_bwd", line_of(clip_gradient_bwd))
    assert f.line == line_with(loss, "# clipped") and "not linear in its cotangent" in f.note


def test_check_rules_holds_non_array_leaves_fixed():
    """An equinox module's activation function is a leaf of params: held, not traced."""
    params = {"w": x64([0.3, 0.5]), "act": jax.nn.relu, "name": "layer"}
    r = jgc.check_rules(lambda p: jnp.sum(p["act"](p["w"]) * 2.0), params)
    assert r.ok and r.n_equations >= 2


def test_an_equation_that_cannot_be_judged_is_named_not_blamed():
    """jnp.linalg.norm at 0: jax.grad is NaN (sqrt's infinite slope times 0), finite
    differences see a kink; no rule is wrong, and sqrt, where they cannot judge, is named."""
    def loss(x):
        return jnp.linalg.norm(x)  # norm at 0

    report = jgc.check_grad(loss, x64([0.0, 0.0]))
    f = report.rule
    assert not report.ok and not f.found and f.name == "sqrt"
    assert f.line == line_with(loss, "# norm at 0")
    assert f.summary.startswith("no equation is found wrong, but jax's rule for the primitive "
                                "`sqrt` at ")


def test_a_loop_too_long_to_unroll_is_checked_as_one():
    def loss(x):
        c, _ = jax.lax.scan(lambda c, _: (sin2(c) * 0.5, None), x, None,  # long scan
                            length=eq.MAX_ITERATIONS + 1)
        return jnp.sum(c)

    report = jgc.check_grad(loss, x64([0.3]))
    f = report.rule
    assert f.found and f.kind == "loop" and f.name == "scan"
    assert f.line == line_with(loss, "# long scan")
    assert "too long to unroll" in f.summary


def test_a_rule_holding_a_dead_tracer_is_named_as_not_judged():
    """A nondiff_argnums rule given an array closes over a tracer of the loss's trace: it
    cannot be evaluated on its own, which is said (jgc's own check still judges the loss)."""
    @partial(jax.custom_jvp, nondiff_argnums=(0,))
    def scaled(n, x):
        return x * n

    @scaled.defjvp
    def scaled_jvp(n, primals, tangents):
        (x,), (t,) = primals, tangents
        return scaled(n, x), 2.0 * n * t

    report = jgc.check_grad(lambda x: jnp.sum(scaled(jnp.asarray(3.0), x)), x64([0.5, 1.5]))
    f = report.rule
    assert not report.ok and not f.found and f.name == "scaled_jvp"
    assert "cannot be evaluated outside the loss's own trace" in f.summary


def test_rule_inside_remat_vmap_and_with_aux():
    @jax.checkpoint
    def body(x):
        return jax.vmap(sin2)(x)  # remat call

    def loss(x):
        return jnp.sum(body(x)), {"aux": x}

    report = jgc.check_grad(loss, x64([[0.1, 0.2], [0.3, 0.4]]), has_aux=True)
    f = report.rule
    assert f.name == "sin2_jvp" and f.line == line_with(body, "# remat call")


def test_rule_inside_a_while_loop_is_audited_per_iteration():
    def f(x, n):
        return jnp.sum(jax.lax.fori_loop(0, n, lambda i, c: softplus_hi(c) + 0.6, x))  # loop

    r = jgc.check_rules(f, x64([0.2]), np.int32(6))
    (row,) = r.wrong
    assert row.name == "softplus_hi_jvp" and row.calls == 6
    assert row.first_wrong.startswith("while iteration ")
    assert r.finding.iteration == int(row.first_wrong.split()[-1])


def test_nan_in_a_branch_not_taken_is_named():
    """The where-NaN trap, as in jax.scipy.special.spence on (1, 2) (jax.grad NaN): log of a
    negative number in the branch not taken; every rule is right."""
    def loss(x):
        return jnp.sum(jnp.where(x < 1.0, x * jnp.log(1.0 - x), x ** 2))  # trap

    report = jgc.check_grad(loss, x64([1.5, 0.5]))
    f = report.rule
    assert not report.ok and not f.found and (f.kind, f.name) == ("nonfinite", "log")
    assert f.line == line_with(loss, "# trap") and "0 times NaN is NaN" in f.summary


@jax.custom_jvp
def scaled_sin(x, y):
    return jnp.sin(x) * y


@scaled_sin.defjvp
def scaled_sin_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    return scaled_sin(x, y), jnp.cos(x) * y * tx - jnp.sin(x) * ty  # the bug: ty's sign


@pytest.mark.parametrize("x64_mode", [True, False])
def test_the_wrong_input_is_named_in_either_precision(x64_mode):
    def loss(p):
        return jnp.sum(scaled_sin(p["a"], p["b"]))

    dtype = np.float64 if x64_mode else np.float32
    p = {"a": np.array([0.3, 0.9], dtype), "b": np.array([1.5, -0.7], dtype)}
    report = jgc.check_grad(loss, p, x64=x64_mode)
    assert report.leaf("['a']").status == "ok" and report.leaf("['b']").status == "mismatch"
    f = report.rule
    assert f.name == "scaled_sin_jvp" and f.inputs == ("input 1 (y)",)
