"""The structured evaluator (structured.py): every rule against the dense path, over random
shapes, dimension numbers, layouts and dtypes (hypothesis); dense-vs-structured agreement on
every framework and benchmark model; and real checks that go through it.

Tolerance. The structured pass forms a perturbed value as base + change, where the dense path
recomputes it from scratch: the same terms summed in another order. Reordering a sum of n terms
moves it by at most about n·u·Σ|terms|. The sums below have at most a few hundred terms of the
size of the outputs, so 1024·u·max(1, max|output|) bounds the difference with room to spare,
while a wrong rule (a misplaced slice, a wrong coordinate) is off by O(1) of the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import jgc
from jgc._src.compat import enable_x64
from jgc._src.evaluators import dense, factory, programs, xla
from jgc._src.evaluators.structured.evaluator import StructuredEvaluator
from jgc._src.evaluators.structured.flatjaxpr import base_values, flatten
from jgc._src.evaluators.structured.leafplan import leaf_losses, plan_leaf
from jgc._src.evaluators.structured.rules import _groups
from jgc._src.stages import plan as pl
from jgc._src.stages.inputs import promote_args
from jgc._src.stages.split import split_checked
from jgc.examples import zoo

# derandomize: CI draws the same examples every run, so that it fails for a change, not for
# a newly drawn corner. To explore, turn it off locally (random seeds 1 to 14 pass).
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([np.float32, np.float64])
REORDER = 1024  # see the module docstring


def structured_and_dense(f, x, dtype, seed=0):
    """The outputs of f at x + s·e_i for every entry i of x (one random step each), by the
    structured pass and by plain evaluation, as (n, outputs) arrays, and the leaf's plan."""
    with enable_x64(dtype == np.float64):
        x = jnp.asarray(x, dtype)
        shape, v = x.shape, x.reshape(-1)
        closed = jax.make_jaxpr(lambda v: f(v.reshape(shape)))(v)
        flat = flatten(closed)
        leaf = flat.invars[0]
        plan = plan_leaf(flat, leaf, flat.avals, jax.ShapeDtypeStruct(v.shape, dtype),
                                    dtype)
        bases = jax.jit(lambda v, c: base_values(flat, (v,), c, plan.needed))(
            v, closed.consts)
        rng = np.random.default_rng(seed)
        index = jnp.arange(v.size, dtype=jnp.int32)
        step = jnp.asarray(rng.choice([-1.0, 1.0], v.size) * 10.0 ** rng.uniform(-3, -1, v.size),
                           dtype)
        got = jax.jit(lambda b, i, s: leaf_losses(
            flat, list(plan.eqns), leaf, plan.needed, b, v, i, s, dtype))(bases, index, step)
        want = jax.jit(jax.vmap(lambda i, s: jnp.ravel(f(v.at[i].set(v[i] + s).reshape(shape)))))(
            index, step)
        return np.asarray(got), np.asarray(want), plan


def assert_agree(f, x, dtype, structural=(), seed=0):
    """Structured == dense to rounding; and the primitives in `structural` were handled by
    their rules, not by the dense fallback (else this test would prove nothing about them)."""
    got, want, plan = structured_and_dense(f, x, dtype, seed)
    u = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=REORDER * u * max(1.0, float(np.max(np.abs(want)))))
    fell_back = set(plan.fallbacks) & set(structural)
    assert not fell_back, f"{fell_back} went through the dense fallback"
    return plan


# -- dot_general: any batch and contracting dimensions, either operand perturbed ----------------

@st.composite
def contractions(draw):
    size = st.integers(1, 4)
    nb, nc = draw(st.integers(0, 1)), draw(st.integers(1, 2))
    nfl, nfr = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    b, c = [draw(size) for _ in range(nb)], [draw(size) for _ in range(nc)]
    fl, fr = [draw(size) for _ in range(nfl)], [draw(size) for _ in range(nfr)]
    # Logical order (batch, contracting, free) permuted into a random layout per operand.
    lperm = draw(st.permutations(range(nb + nc + nfl)))
    rperm = draw(st.permutations(range(nb + nc + nfr)))
    lshape = [(b + c + fl)[j] for j in lperm]
    rshape = [(b + c + fr)[j] for j in rperm]
    lpos, rpos = {j: a for a, j in enumerate(lperm)}, {j: a for a, j in enumerate(rperm)}
    dims = (([lpos[nb + j] for j in range(nc)], [rpos[nb + j] for j in range(nc)]),
            ([lpos[j] for j in range(nb)], [rpos[j] for j in range(nb)]))
    return lshape, rshape, dims, draw(st.booleans()), draw(DTYPES)


@SETTINGS
@given(contractions())
def test_dot_general_rule_agrees_with_dense(case):
    lshape, rshape, dims, left, dtype = case
    rng = np.random.default_rng(1)
    other = rng.normal(size=rshape if left else lshape)
    w = rng.normal(size=4)

    def f(x):
        out = lax.dot_general(x, other.astype(x.dtype), dims) if left else \
            lax.dot_general(other.astype(x.dtype), x, dims)
        return jnp.tanh(out) * w[0] + out ** 2 * w[1]  # elementwise rules on the slab

    assert_agree(f, rng.normal(size=lshape if left else rshape), dtype,
                 structural=("dot_general", "tanh", "mul", "integer_pow", "add"))


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), DTYPES)
def test_mlp_slab_propagation_has_no_fallback(m, d, h, o, dtype):
    """Level 2: W1's perturbation stays a column through bias, tanh and the next matmul (a
    rank-1 update), then through log-softmax and the mean."""
    rng = np.random.default_rng(2)
    X, b1, W2 = rng.normal(size=(m, d)), rng.normal(size=h), rng.normal(size=(h, o))

    def f(W1):
        z = jnp.tanh(X.astype(W1.dtype) @ W1 + b1.astype(W1.dtype)[None, :]) @ W2.astype(W1.dtype)
        return jnp.mean((z - 1.0) ** 2)

    plan = assert_agree(f, rng.normal(size=(d, h)), dtype, structural=("dot_general", "tanh"))
    assert not plan.fallbacks


# -- conv_general_dilated: strides, padding, dilation, feature groups, layouts ---------------

@st.composite
def convolutions(draw):
    nd = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 2))
    ig, og = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    spatial = [draw(st.integers(3, 6)) for _ in range(nd)]
    window = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 2)) for _ in range(nd)]
    lhs_dil = [draw(st.integers(1, 2)) for _ in range(nd)]
    rhs_dil = [draw(st.integers(1, 2)) for _ in range(nd)]
    padding = draw(st.sampled_from(["VALID", "SAME", "explicit"]))
    if padding == "explicit" or any(d > 1 for d in lhs_dil):
        padding = [(draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd)]
    channels_last = draw(st.booleans())
    letters = "HW"[:nd] if nd == 2 else "W"
    lhs = ("N" + letters + "C") if channels_last else ("NC" + letters)
    rhs = (letters + "IO") if channels_last else ("OI" + letters)
    batch = draw(st.integers(1, 2))
    sizes = {"N": batch, "C": groups * ig, **dict(zip(letters, spatial))}
    lshape = [sizes[a] for a in lhs]
    ksizes = {"O": groups * og, "I": ig, **dict(zip(letters, window))}
    kshape = [ksizes[a] for a in rhs]
    return dict(lhs=lhs, rhs=rhs, lshape=lshape, kshape=kshape, strides=strides,
                padding=padding, lhs_dil=lhs_dil, rhs_dil=rhs_dil, groups=groups,
                out_channels=groups * og, window=window, dtype=draw(DTYPES))


def _conv(c, x, k):
    return lax.conv_general_dilated(x, k, c["strides"], c["padding"], c["lhs_dil"], c["rhs_dil"],
                                    (c["lhs"], c["rhs"], c["lhs"]),
                                    feature_group_count=c["groups"])


@SETTINGS
@given(convolutions())
def test_conv_kernel_and_input_rules_agree_with_dense(c):
    """A perturbed kernel entry of a first convolution: one output channel (the kernel rule);
    then, after relu-free tanh, a second convolution whose input differs in that channel only
    (the input rule)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=c["lshape"])
    nd = len(c["window"])
    letters = c["rhs"].replace("O", "").replace("I", "")
    k2sizes = {"O": 2, "I": c["out_channels"], **{a: 1 for a in letters}}
    K2 = rng.normal(size=[k2sizes[a] for a in c["rhs"]])
    second = dict(c, strides=[1] * nd, padding="VALID", lhs_dil=[1] * nd, rhs_dil=[1] * nd,
                  groups=1)

    def f(k):
        y = jnp.tanh(_conv(c, X.astype(k.dtype), k))
        return _conv(second, y, K2.astype(k.dtype))

    got, want, plan = structured_and_dense(f, rng.normal(size=c["kshape"]), c["dtype"])
    if 0 in want.shape:
        return
    u = float(np.finfo(c["dtype"]).eps)
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=REORDER * u * max(1.0, float(np.max(np.abs(want)))))
    # A transposed convolution (lhs dilation) is left to the dense fallback by design.
    transposed = any(d != 1 for d in c["lhs_dil"])
    assert ("conv_general_dilated" in plan.fallbacks) == transposed


# -- structural rules, reductions, pooling --------------------------------------------------

def _pool(kind):
    def run(y):  # (a, b, c): windows of 2 along the first two axes, stride 1 and 2
        init, op = (0.0, lax.add) if kind == "sum" else (-jnp.inf, lax.max)
        return lax.reduce_window(y, jnp.asarray(init, y.dtype), op, (2, 2, 1), (1, 2, 1),
                                 "VALID")
    return run


STRUCTURAL = {
    "transpose": (lambda y: jnp.transpose(y, (2, 0, 1)), ("transpose",)),
    "reshape_merge": (lambda y: y.reshape(-1, y.shape[2]), ("reshape",)),
    "reshape_split": (lambda y: y.reshape(-1, y.shape[2]).reshape(y.shape[0], 1, y.shape[1], 1,
                                                                  y.shape[2]), ("reshape",)),
    # Merging the fixed axis with a spanned one, then contracting over the merged axis (a
    # conv's feature map flattened into a dense layer): the other operand is split instead.
    "reshape_contract": (lambda y: y.reshape(y.shape[0], -1) @ jnp.cos(
        jnp.arange(y.shape[1] * y.shape[2] * 3, dtype=y.dtype)).reshape(-1, 3),
        ("reshape", "dot_general")),
    "broadcast": (lambda y: jnp.broadcast_to(y[:, None], (y.shape[0], 3, *y.shape[1:])),
                  ("broadcast_in_dim",)),
    "squeeze": (lambda y: jnp.squeeze(y[:, :1], 1), ("squeeze", "slice")),
    "slice": (lambda y: y[1:, ::2], ("slice",)),
    "concatenate": (lambda y: jnp.concatenate([jnp.ones_like(y[:1]), y, y[:1] * 0], 0),
                    ("concatenate",)),
    "sum_axis": (lambda y: jnp.sum(y, axis=1), ("reduce_sum",)),
    "max_axis": (lambda y: jnp.max(y, axis=1), ("reduce_max",)),
    "sum_pool": (_pool("sum"), ("reduce_window_sum",)),
    "max_pool": (_pool("max"), ("reduce_window_max",)),
    # The jaxpr's mul broadcasts the (1, ..., 1, c) factor's size-1 axes.
    "broadcasting_mul": (lambda y: y * jnp.arange(y.shape[-1], dtype=y.dtype).reshape(
        (1,) * (y.ndim - 1) + (-1,)) - 1.0, ("mul",)),
}


@SETTINGS
@given(st.sampled_from(sorted(STRUCTURAL)), st.integers(2, 4), st.integers(2, 5),
       st.integers(1, 3), DTYPES)
def test_structural_rules_agree_with_dense_after_a_contraction(name, a, b, c, dtype):
    """The op acts on the slab a contraction produces (fixed along the contraction's free axis
    of the perturbed operand), then the result is squared and summed along one axis."""
    op, prims = STRUCTURAL[name]
    rng = np.random.default_rng(4)
    X = rng.normal(size=(a, 3, b))

    def f(W):  # W: (3, c); Y = X·W contracted over the 3: (a, b, c), fixed along c
        y = jnp.einsum("ibk,bc->ikc", X.astype(W.dtype), W)
        return jnp.sum(jnp.tanh(op(y)) ** 2, axis=0)

    assert_agree(f, rng.normal(size=(3, c)), dtype, structural=prims)


@pytest.mark.parametrize("old, new, groups", [
    # unit axes join the group before them
    ((4, 2), (2, 1, 2, 1, 2), [([0], [0, 1, 2, 3]), ([1], [4])]),
    ((2, 2, 2), (4, 2), [([0, 1], [0]), ([2], [1])]),
    ((3,), (1, 3, 1), [([0], [0, 1, 2])]),
    ((2, 3, 4), (24,), [([0, 1, 2], [0])]),
    ((4, 6), (6, 4), [([0, 1], [0, 1])]),  # one group: the sizes meet only at the end
])
def test_reshape_axis_groups(old, new, groups):
    assert _groups(old, new) == groups


@SETTINGS
@given(st.sampled_from(sorted(STRUCTURAL)), DTYPES)
def test_structural_rules_on_the_leaf_itself(name, dtype):
    """The same ops on the one-hot leaf (every axis fixed)."""
    op, _ = STRUCTURAL[name]
    rng = np.random.default_rng(5)
    assert_agree(lambda y: jnp.sin(op(y)), rng.normal(size=(3, 4, 2)), dtype)


def test_fallbacks_are_exact_too():
    """Operations without a rule (a gather by labels, cumsum, a sort) are evaluated densely
    under vmap and still agree; the plan records them."""
    rng = np.random.default_rng(6)
    labels, X = np.array([2, 0, 1]), rng.normal(size=(3, 4))

    def f(W):
        z = X @ W
        logp = jax.nn.log_softmax(z)
        return -jnp.take_along_axis(logp, labels[:, None], axis=1).sum() + jnp.sort(
            jnp.cumsum(z, 0).ravel())[-1]

    plan = assert_agree(f, rng.normal(size=(4, 3)), np.float64)
    assert plan.fallbacks


# -- every framework and benchmark model -------------------------------------------------------

def _evaluators(model, x64):
    sp = split_checked(model.params)
    plan = pl.make_plan(sp, mode="full", x64=x64, eps=None, samples=0, seed=0)
    args, _ = promote_args(model.args, x64)  # as check_grad does
    with enable_x64(x64):
        base = factory.make_evaluator(model.loss, sp, plan.theta, plan.dtypes, args)
        kw = dict(traced=base.traced)
        s = StructuredEvaluator(model.loss, sp, plan.theta, plan.dtypes,
                                                     args, **kw)
        d = dense.DenseEvaluator(model.loss, sp, plan.theta, plan.dtypes, args, **kw)
    d.per_leaf = True
    return sp, plan, s, d


BENCHMARK_MODELS = {
    "mlp_w1": lambda: zoo.mlp((20, 16, 3), batch=8),
    "mlp_w2": lambda: zoo.mlp((784, 64, 10), batch=32),
    "mlp_4m": lambda: zoo.mlp((3072, 1024, 1024, 10), batch=32),
    "cnn_mnist": lambda: zoo.flax_cnn("mnist"),
    "lstm_big": lambda: zoo.lstm_scan(d=32, h=128, T=16, m=8),
    "attention_big": lambda: zoo.attention(d=128, T=16, m=4),
    **zoo.ZOO,
}


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(BENCHMARK_MODELS))
def test_structured_agrees_with_dense_on_every_model(name, x64):
    model = BENCHMARK_MODELS[name]()
    sp, plan, s, d = _evaluators(model, x64)
    rng = np.random.default_rng(7)
    per_leaf = 24  # entries per leaf, at random, with random steps of both signs
    index = np.concatenate([rng.integers(sp.offsets[k], sp.offsets[k + 1], per_leaf)
                            for k in range(len(sp.checked)) if sp.offsets[k + 1] > sp.offsets[k]])
    step = rng.choice([-1, 1], len(index)) * 10.0 ** rng.uniform(-4, -2, len(index))
    with enable_x64(x64):
        a, b, f0 = s.perturbed(index, step), d.perturbed(index, step), d.at()
    u = float(np.finfo(plan.dtypes[0]).eps)
    # Both sum the same terms in different orders; the losses are means of O(1) terms.
    assert np.max(np.abs(a - b)) <= 16 * u * max(1.0, abs(f0)), s.strategy_note()
    assert not s.failed, s.failed
    assert any(p.use for p in s.plans.values()), s.strategy_note()  # it was exercised


@pytest.mark.parametrize("name", ["mlp_w2", "cnn_mnist", "attention_big"])
def test_directions_from_the_base_values_agree_with_dense(name):
    """Directions (whole-leaf perturbations, group testing's sub-ranges) evaluated from the
    structured pass's base values: the same losses as the dense program, to rounding."""
    sp, plan, s, d = _evaluators(BENCHMARK_MODELS[name](), True)
    rng = np.random.default_rng(3)
    with enable_x64(True):
        f0 = d.at()
        for k in range(len(sp.checked)):
            size = sp.offsets[k + 1] - sp.offsets[k]
            vectors = s.vectors(rng.normal(size=(2, size)) * 1e-3)
            vid, mult = np.array([0, 1, 0, 1]), np.array([1.0, -1.0, 0.5, -0.25])
            lo, hi = np.array([0, 0, size // 3, 1]), np.array([size, size, size, size // 2 + 1])
            a = s.along(k, vectors, vid, mult, lo, hi)
            b = dense.DenseEvaluator.along(s, k, vectors, vid, mult, lo, hi)
            assert np.max(np.abs(a - b)) <= 16 * 2.0 ** -52 * max(1.0, abs(f0)), k
    assert not s.failed, s.failed


def test_big_models_take_the_structured_pass_where_it_pays():
    """The CNN's convolutions and dense layers are structured, and so is the last bias
    through log-softmax's max over the classes (rules._reduce_extreme)."""
    sp, _, s, _ = _evaluators(zoo.flax_cnn("mnist"), True)
    with enable_x64(True):
        s._setup()
    paths = {sp.checked_specs()[k].path: p for k, p in s.plans.items()}
    for leaf in ("['Conv_0']['kernel']", "['Conv_1']['kernel']", "['Dense_0']['kernel']"):
        assert paths[leaf].use and paths[leaf].dense >= 5 * paths[leaf].structured, leaf
    assert paths["['Dense_0']['kernel']"].dense >= 1000 * paths["['Dense_0']['kernel']"].structured
    assert paths["['Dense_1']['bias']"].use, "log-softmax's max: tests/test_structured_loops"
    note = s.strategy_note()
    assert "structured evaluation" in note and "['Dense_0']['kernel']" in note


# -- checks through the structured evaluator ---------------------------------------------------

def _w2():
    model = zoo.mlp((784, 32, 10), batch=16, dtype=np.float64)
    return model, zoo.mlp_grad(model)


def test_a_full_check_through_it_passes_and_names_a_planted_bug():
    model, grad = _w2()
    r = jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="full")
    assert r.ok and any("structured evaluation" in n for n in r.notes), str(r)

    def wrong(p, *args):  # one entry of W0 off by 3e-3 relative, as a typo in a loop would
        g = grad(p, *args)
        g["W0"] = g["W0"].copy()
        g["W0"][100, 7] *= 1.003
        return g

    r = jgc.check_grad(model.loss, model.params, *model.args, grad=wrong, mode="full")
    assert not r.ok and [b.path for b in r.bad_leaves] == ["['W0']"]
    assert r.bad_leaves[0].worst_index == (100, 7) and r.bad_leaves[0].n_mismatch == 1


def test_an_operation_without_a_rule_falls_back_and_says_so():
    """A cumulative sum (no rule) spreads W0's perturbation, and a wide product after it
    costs as much as the dense pass; the note names it (scan has a rule: test_structured_loops)."""
    model = zoo.mlp((784, 32, 10), batch=16, dtype=np.float64)
    wide = np.random.default_rng(8).normal(size=(32, 4000))

    def loss(p, X, Y):
        z = jnp.cumsum(X @ p["W0"], axis=1) @ wide
        return model.loss(p, X, Y) + 1e-6 * jnp.sum(z ** 2)

    r = jgc.check_grad(loss, model.params, *model.args, mode="sample", samples=8)
    assert r.ok
    note = next(n for n in r.notes if "dense evaluation" in n)
    assert "['W0']" in note and "cumsum" in note


def test_second_structured_check_compiles_nothing():
    model, grad = _w2()
    jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="sample", samples=32)
    before = programs.CACHE.compiles
    r = jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="sample",
                       samples=32)
    assert r.ok and programs.CACHE.compiles == before


def test_structured_pass_sees_a_changed_closure():
    """The trust rule holds on this path too: a changed closed-over array is re-read."""
    model, grad = _w2()
    scale = np.ones(1)

    def loss(p, X, Y):
        return model.loss(p, X, Y) * scale[0]

    assert jgc.check_grad(loss, model.params, *model.args, grad=grad, mode="sample",
                          samples=16).ok
    scale[0] = 2.0  # the gradient is now half of the truth everywhere
    r = jgc.check_grad(loss, model.params, *model.args, grad=grad, mode="sample", samples=16)
    assert not r.ok and all(b.pattern == "scale" for b in r.bad_leaves)


def test_evaluator_dense_turns_it_off():
    model, grad = _w2()
    r = jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="sample",
                       samples=16, evaluator="dense")
    assert r.ok and not any("structured" in n for n in r.notes)
    auto = jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="sample",
                          samples=16)
    assert auto.ok and any("structured evaluation" in n for n in auto.notes)


def test_evaluator_refuses_an_unknown_strategy():
    with pytest.raises(jgc.InputError, match=r"evaluator='structured' is not one of "
                                             r"\('auto', 'dense'\)"):
        jgc.check_grad(lambda p: jnp.sum(p ** 2), np.ones(3), evaluator="structured")


def test_no_chunk_by_n_array_on_the_structured_path():
    """Memory: the structured program never forms a (chunk x n) perturbation array, nor
    anything as large; the largest intermediate of W2's first layer is a chunk of its hidden
    activations."""
    model = zoo.mlp((784, 64, 10), batch=32)
    with enable_x64(True):
        v = jnp.asarray(model.params["W0"]).reshape(-1)
        p = dict(model.params)

        def f(w):
            return model.loss({**p, "W0": w.reshape(784, 64)}, *model.args)

        closed = jax.make_jaxpr(f)(v)
        flat = flatten(closed)
        plan = plan_leaf(flat, flat.invars[0], flat.avals,
                                    jax.ShapeDtypeStruct(v.shape, v.dtype), v.dtype)
        chunk = 64
        program = jax.make_jaxpr(lambda b, i, s: leaf_losses(
            flat, list(plan.eqns), flat.invars[0], plan.needed, b, v, i, s, v.dtype))(
            tuple(flat.avals[i] for i in plan.needed), jnp.zeros(chunk, jnp.int32),
            jnp.zeros(chunk))
    sizes = [int(np.prod(o.aval.shape)) for e in program.jaxpr.eqns for o in e.outvars]
    assert plan.use and max(sizes) <= chunk * 32 * 64  # (chunk, batch, hidden)
    assert max(sizes) < chunk * v.size / 20


# -- inputs the structured pass once mishandled --------------------------------------------

def test_a_while_loop_outside_the_perturbed_path_is_computed_once():
    """A while loop of unknown length (here on the data) made the dense work infinite, and the
    report's wording of the saving crashed (round(inf))."""
    rng = np.random.default_rng(0)
    p = {"W": rng.normal(size=(200, 120)) * 0.1, "b": np.zeros(120)}
    X = rng.normal(size=(8, 200))

    def loss(p, X):
        Xn = lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.9), (0, X))[1]
        return jnp.sum(jnp.tanh(Xn @ p["W"] + p["b"][None, :]) ** 2)

    r = jgc.check_grad(loss, p, X, mode="sample")
    assert r.ok, str(r)
    assert any("unbounded factor (a while loop runs once per check" in n for n in r.notes)


def test_minus_infinity_masks_are_no_nan_on_the_structured_path():
    """A -inf mask summed over the perturbed axis: the change there is 0, not -inf - -inf."""
    rng = np.random.default_rng(0)
    p = {"W": rng.normal(size=(200, 120)) * 0.1, "b": np.zeros(120)}
    X = rng.normal(size=(8, 200))
    mask = np.where(np.arange(120) < 60, 0.0, -np.inf)

    def loss(p, X):
        z = X @ p["W"] + p["b"][None, :]
        return jnp.sum(jnp.exp(jnp.sum(z + mask[None, :], axis=1))) + 1e-3 * jnp.sum(z ** 2)

    r = jgc.check_grad(loss, p, X, mode="sample")
    assert r.ok, str(r)
    assert any("structured evaluation" in n for n in r.notes)
    small = np.array([0.0, -np.inf, 0.0])  # the rule itself, against plain evaluation
    got, want, _ = structured_and_dense(lambda w: jnp.sum(jnp.exp(jnp.sum(
        X[:, :4] @ w + small[None, :], axis=1))) + jnp.sum(w ** 2), rng.normal(size=(4, 3)),
        np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_gather_from_a_large_table_stays_within_the_memory_budget(monkeypatch):
    """Perturbing an embedding table makes it dense per perturbation at the gather (no rule):
    its chunks must count that, as the dense path counts its copies (2.1 GB against a 1 GiB
    budget for a 1M-entry table before)."""
    rng = np.random.default_rng(0)
    p = {"table": rng.normal(size=(5000, 20)) * 0.1, "w": rng.normal(size=(20,))}
    ids = rng.integers(0, 5000, size=(64,))
    budget = 8 * 2**20
    seen = []
    original = dense.structured_chunk

    def spy(per_bytes, memory_budget):
        seen.append((per_bytes, original(per_bytes, memory_budget), memory_budget))
        return seen[-1][1]

    monkeypatch.setattr(dense, "structured_chunk", spy)
    loss = lambda p, ids: jnp.sum(jnp.tanh(p["table"][ids] @ p["w"]) ** 2)
    r = jgc.check_grad(loss, p, ids, mode="sample", memory_budget=budget)
    assert r.ok and any("structured evaluation" in n and "['table']" in n for n in r.notes)
    table_bytes = p["table"].nbytes
    assert any(per >= 2 * table_bytes for per, _, _ in seen)  # the dense table is counted
    assert all(chunk * per <= b or chunk == 1 for per, chunk, b in seen)


def test_a_transposed_convolution_is_left_to_the_dense_path():
    """A decoder: conv, transposed conv, conv. XLA runs a transposed convolution per
    perturbation far slower than its batched dense evaluation, so the leaves whose
    perturbations reach it go dense; and its programs are compiled fully optimised, since the
    light options ran it 60x slower (78.7 s against 0.20 s)."""
    rng = np.random.default_rng(0)
    dn = ("NHWC", "HWIO", "NHWC")
    p = {"k1": rng.normal(size=(3, 3, 16, 32)) * 0.1, "b1": np.zeros(32),
         "k2": rng.normal(size=(4, 4, 32, 32)) * 0.05, "b2": np.zeros(32),
         "k3": rng.normal(size=(3, 3, 32, 1)) * 0.1}
    X = rng.normal(size=(2, 8, 8, 16))

    def loss(p, X):  # the biases on the NHWC channel axis
        h = jax.nn.relu(lax.conv_general_dilated(X, p["k1"], (1, 1), "SAME",
                                                 dimension_numbers=dn) + p["b1"][None, None, None])
        h = jax.nn.relu(lax.conv_transpose(h, p["k2"], (2, 2), "SAME",
                                           dimension_numbers=dn) + p["b2"][None, None, None])
        return jnp.mean(lax.conv_general_dilated(h, p["k3"], (1, 1), "SAME",
                                                 dimension_numbers=dn) ** 2)

    r = jgc.check_grad(loss, p, X, mode="sample", samples=4)
    assert r.ok, str(r)
    note = next(n for n in r.notes if "structured evaluation" in n)
    assert "dense evaluation for ['b1'], ['k1'], ['k2']" in note
    assert "structured evaluation (only what each perturbation changes is recomputed) for " \
           "['b2'], ['k3']" in note
    lowered = jax.jit(lambda x, k: lax.conv_transpose(x, k, (2, 2), "SAME", dimension_numbers=dn)
                      ).lower(X[..., :2], p["k2"][:, :, :2, :2]).as_text()
    assert xla.slowdown(lowered) == 100.0
    plain = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                          dimension_numbers=dn)).lower(
        X, p["k1"]).as_text()
    assert xla.slowdown(plain) == 1.0


def test_a_structured_program_slower_than_a_forward_pass_is_abandoned(monkeypatch):
    """The guard: after its first chunk, a structured program slower per perturbation than a
    whole forward pass gives way to the dense program, with the same values and a note."""
    rng = np.random.default_rng(0)
    p = {"W": rng.normal(size=(200, 120)) * 0.1, "b": np.zeros(120)}
    X = rng.normal(size=(8, 200))
    loss = lambda p, X: jnp.sum(jnp.tanh(X @ p["W"] + p["b"][None, :]) ** 2)
    fast = jgc.check_grad(loss, p, X, mode="sample", samples=8)
    original = StructuredEvaluator._setup

    def setup(self):
        original(self)
        self.forward_seconds = 0.0  # as if a forward pass cost nothing

    monkeypatch.setattr(StructuredEvaluator, "_setup", setup)
    slow = jgc.check_grad(loss, p, X, mode="sample", samples=8)
    assert slow.ok and fast.ok
    assert any("the structured pass was abandoned: it ran" in n and "more than a whole forward "
               "pass" in n for n in slow.notes), slow.notes
    for a, b in zip(fast.leaves, slow.leaves):
        # The two paths round differently: compare where they name the same worst entry (a
        # near-tie between two entries may make another one the worst).
        if a.worst_index == b.worst_index:
            np.testing.assert_allclose(a.numerical, b.numerical, rtol=1e-7)
