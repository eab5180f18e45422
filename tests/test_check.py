"""check_grad / assert_grad / numerical_grad on every kind of pytree and gradient."""

import concurrent.futures
import contextlib
import gc
import threading
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import snapshot

import jgc
from jgc.examples import hidden_random_dropout, mlp, wrong_custom_vjp


class Layer(typing.NamedTuple):
    w: typing.Any
    b: typing.Any


def _loss(params, x):
    """A loss that uses every leaf kind: dict, list, tuple, NamedTuple, scalar, empty, int."""
    layers, extra = params["layers"], params["extra"]
    h = x
    for layer in layers:
        h = jnp.tanh(h @ layer.w + layer.b[None, :])
    return (jnp.sum(h ** 2) + extra["scale"] * jnp.sum(h) + jnp.sum(extra["empty"])
            + 0.0 * extra["steps"] + jnp.sum(extra["pair"][0] * extra["pair"][1]))


def _params(rng):
    return {"layers": [Layer(rng.normal(size=(3, 4)), rng.normal(size=4)),
                       Layer(jnp.asarray(rng.normal(size=(4, 2))), jnp.zeros(2))],
            "extra": {"scale": 0.7, "empty": np.zeros((0, 3)), "steps": 3, "name": "mlp",
                      "fn": jnp.tanh, "none": None,
                      "pair": (np.float64(1.5), np.array([2.0, -1.0]))}}


@pytest.fixture
def tree_case():
    rng = np.random.default_rng(0)
    return _params(rng), rng.normal(size=(5, 3))


def test_any_pytree_checked_with_skips(tree_case):
    params, x = tree_case
    r = jgc.check_grad(_loss, params, x)
    assert r.ok, str(r)
    paths = [leaf.path for leaf in r.leaves]
    assert paths == [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda v: v is None)[0]]
    status = {leaf.path: leaf.status for leaf in r.leaves}
    assert status["['layers'][0].w"] == "ok" and status["['layers'][1].b"] == "ok"
    assert status["['extra']['scale']"] == "ok"  # a Python float is checked
    assert status["['extra']['pair'][0]"] == "ok"  # a NumPy scalar too
    for skipped in ("['extra']['steps']", "['extra']['name']", "['extra']['fn']",
                    "['extra']['none']"):
        assert status[skipped] == "skipped"
    empty = r.leaf("['extra']['empty']")
    assert empty.n_checked == 0 and empty.status == "ok" and empty.shape == (0, 3)
    assert r.n_params == 12 + 4 + 8 + 2 + 1 + 1 + 2


def test_gradient_as_function_pytree_and_flat_vector(tree_case):
    params, x = tree_case
    sub = lambda p: {"layers": p["layers"], "extra": {k: p["extra"][k] for k in ("scale",
                                                                               "pair", "empty")}}
    def g_fn(p, x):
        return jax.grad(lambda q: _loss({"layers": q["layers"], "extra": {**p["extra"], **q[
            "extra"]}}, x))(sub(p))
    g_tree = jax.tree_util.tree_map(np.asarray, g_fn(params, x))
    for grad in (g_fn, g_tree):
        assert jgc.check_grad(_loss, params, x, grad=grad).ok
    # A flat vector over the checked leaves, in tree order.
    r = jgc.check_grad(_loss, params, x)
    flat = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(
        jgc.numerical_grad(_loss, params, x))])
    assert jgc.check_grad(_loss, params, x, grad=flat).ok
    flat_bad = flat.copy()
    flat_bad[-1] *= 3
    r = jgc.check_grad(_loss, params, x, grad=flat_bad)
    assert [leaf.path for leaf in r.bad_leaves] == ["['layers'][1].b"]  # last in tree order


def test_flat_vector_in_ravel_pytree_order():
    from jax.flatten_util import ravel_pytree
    params = {"a": np.ones(3), "n": np.arange(2), "b": np.full((2, 2), 0.5)}
    loss = lambda p: (jnp.sum(p["a"] ** 2) + jnp.sum(jnp.sin(p["b"]))
                      + 0 * jnp.sum(p["n"]).astype(p["a"].dtype))
    full = {"a": 2 * params["a"], "n": np.zeros(2), "b": np.cos(params["b"])}
    vec, _ = ravel_pytree(full)  # includes the int leaf, as ravel_pytree does
    assert vec.size == 9
    assert jgc.check_grad(loss, params, grad=vec).ok


def test_numpy_loss_and_numpy_grad_slow_path():
    ex = mlp("sigmoid", xp=np)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    host = "not traceable by JAX (it converts to NumPy), so jgc evaluated it on the host"
    assert r.ok and any(host in n for n in r.notes)
    assert "jax.grad is not available" in " ".join(r.notes)


def test_gradient_function_jitted_or_called_on_host():
    """A traceable gradient function is jitted (traced once); one that is not traceable (NumPy
    code assigning into arrays) is called once on the host with NumPy copies."""
    ex_j = mlp("relu")
    calls = []

    def jax_code(p, X, Y):
        calls.append(type(p["W1"]).__name__)
        return ex_j.grad(p, X, Y)

    assert jgc.check_grad(ex_j.loss, ex_j.params, *ex_j.args, grad=jax_code).ok
    assert len(calls) == 1 and "Tracer" in calls[0]

    def in_place(p, X, Y):  # the classic course style: dz[z <= 0] = 0
        calls.append(type(p["W1"]).__name__)
        z = X @ p["W1"] + p["b1"]
        h = np.maximum(z, 0)
        dout = (h @ p["W2"] + p["b2"] - Y) / len(X)
        dz = dout @ p["W2"].T
        dz[z <= 0] = 0
        return {"W1": X.T @ dz, "b1": dz.sum(0), "W2": h.T @ dout, "b2": dout.sum(0)}

    calls.clear()
    r = jgc.check_grad(ex_j.loss, ex_j.params, *ex_j.args, grad=in_place)
    assert r.ok and calls[-1] == "ndarray"


def test_wrong_custom_vjp_flagged_with_grad_none():
    ex = wrong_custom_vjp()
    r = jgc.check_grad(ex.loss, ex.params, *ex.args)
    assert not r.ok and r.checked_source == "jax.grad"
    assert {leaf.path for leaf in r.bad_leaves} == {"['W']", "['b']"}
    assert r.leaf("['scale']").status == "ok"
    assert r.leaf("['W']").factor == pytest.approx(2.0, rel=1e-6)
    assert "custom_vjp" in r.diagnosis


def test_correct_custom_vjp_passes():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    assert jgc.check_grad(lambda p: jnp.sum(f(p["x"]) ** 2), {"x": np.linspace(-1, 1, 7)}).ok


def test_suspect_numerics_when_hand_and_jax_agree():
    """A step far too large for a fast-varying loss: hand and jax.grad agree, numerics do not."""
    loss = lambda p: jnp.sum(jnp.sin(50 * p)) / 50
    p = np.array([0.3, 0.7, -0.2])
    r = jgc.check_grad(loss, p, grad=lambda p: np.cos(50 * p), eps=0.1)
    assert not r.ok and r.verdict == "suspect_numerics"
    assert "agree with each other but not with finite differences in <params>" in r.diagnosis
    assert "eps=None" in r.diagnosis
    # With the automatic step the same gradient passes.
    assert jgc.check_grad(loss, p, grad=lambda p: np.cos(50 * p)).ok


def test_assert_grad_names_every_bad_leaf():
    ex = mlp("tanh")
    jgc.assert_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    with pytest.raises(AssertionError) as info:
        jgc.assert_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["missing_1_over_m"].grad)
    msg = str(info.value)
    assert msg.startswith("[jgc] gradient check failed (wrong_gradient) in: ")
    assert msg.splitlines()[0].endswith("['W1'], ['W2'], ['b1'], ['b2']")  # tree order
    assert "MISMATCH" in msg


@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.parametrize("initial", [False, True])
def test_x64_restored(fail, initial):
    ex = mlp("tanh")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", initial)
    try:
        grad = ex.grad if not fail else (lambda p, X, Y: 1 / 0)
        if fail:
            with pytest.raises(jgc.InputError, match="ZeroDivisionError"):
                jgc.check_grad(ex.loss, ex.params, *ex.args, grad=grad)
        else:
            assert jgc.check_grad(ex.loss, ex.params, *ex.args, grad=grad).ok
        assert jax.config.jax_enable_x64 is initial
    finally:
        jax.config.update("jax_enable_x64", old)


def test_x64_restored_after_interrupt():
    def loss(p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jgc.check_grad(loss, {"a": np.ones(2)}, grad=lambda p: p)
    assert jax.config.jax_enable_x64 is False


def _automatic() -> bool:
    """Whether Python collects garbage automatically now (enabled, generation 0 threshold > 0)."""
    return gc.isenabled() and gc.get_threshold()[0] > 0


@pytest.mark.parametrize("outcome", ["ok", "error", "interrupt"])
@pytest.mark.parametrize("enabled", [True, False])
def test_garbage_collector_paused_while_tracing_and_restored(outcome, enabled):
    ex = mlp("tanh")
    seen = []

    def loss(p, X, Y):  # a JAX loss: this Python runs while jgc traces it
        seen.append(_automatic())
        if outcome == "interrupt":
            raise KeyboardInterrupt
        return ex.loss(p, X, Y)

    grad = ex.grad if outcome != "error" else (lambda p, X, Y: 1 / 0)
    was, thresholds = gc.isenabled(), gc.get_threshold()
    (gc.enable if enabled else gc.disable)()
    try:
        if outcome == "ok":
            assert jgc.check_grad(loss, ex.params, *ex.args, grad=grad).ok
        else:
            with pytest.raises(KeyboardInterrupt if outcome == "interrupt" else jgc.InputError):
                jgc.check_grad(loss, ex.params, *ex.args, grad=grad)
        assert seen and not any(seen)
        # restored: a user's disabled collector stays off, an enabled one collects again
        assert gc.isenabled() is enabled and gc.get_threshold() == thresholds
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("step", range(6))
def test_an_interrupt_anywhere_in_the_pause_leaves_the_collector_as_it_was(step, monkeypatch):
    """A Ctrl-C (KeyboardInterrupt) raised at each step of pausing and resuming, as Python may
    raise it between any two bytecodes: the collector's state is restored every time."""
    from jgc._src.evaluators import collector

    thresholds = gc.get_threshold()
    calls = {"n": 0}
    real_get, real_set = gc.get_threshold, gc.set_threshold

    def tick():
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise KeyboardInterrupt

    def get_threshold():
        tick()
        return real_get()

    def set_threshold(*a):
        real_set(*a)
        tick()

    monkeypatch.setattr(gc, "get_threshold", get_threshold)
    monkeypatch.setattr(gc, "set_threshold", set_threshold)
    with contextlib.suppress(KeyboardInterrupt):
        with collector.collector_paused():
            tick()
    # The interrupt after the pause took effect, before `with` entered its body: the pause
    # is undone when its context manager is dropped, never left behind.
    cm = collector.collector_paused()
    with contextlib.suppress(KeyboardInterrupt):
        cm.__enter__()
        tick()
    del cm
    monkeypatch.undo()
    assert gc.get_threshold() == thresholds and gc.isenabled()
    assert not collector.COLLECTOR._sections and collector.COLLECTOR._saved is None


def test_a_user_disabling_the_collector_during_a_pause_keeps_it_disabled():
    """gc.disable() on one thread while another thread's check has collection paused: the end of
    the pause must not turn it back on."""
    from jgc._src.evaluators import collector

    paused, disabled = threading.Event(), threading.Event()

    def section():
        with collector.collector_paused():
            paused.set()
            assert disabled.wait(timeout=30)

    worker = threading.Thread(target=section)
    worker.start()
    assert paused.wait(timeout=30)
    try:
        gc.disable()
        disabled.set()
        worker.join(timeout=30)
        assert not gc.isenabled() and gc.get_threshold()[0] > 0
    finally:
        gc.enable()


class _Node:
    """A from-scratch autograd's graph node: its backward closure refers to the node itself, a
    reference cycle that only the cyclic garbage collector frees."""

    live = created = peak = 0

    def __init__(self, data, children=()):
        self.data, self.children, self.backward = data, children, lambda: self
        _Node.live += 1
        _Node.created += 1
        _Node.peak = max(_Node.peak, _Node.live)

    def __del__(self):
        _Node.live -= 1


def test_host_code_keeps_the_garbage_collector():
    """A NumPy loss that builds a graph of cyclic nodes per evaluation (micrograd-style): the
    collector keeps freeing them during the check. Paused for the whole check, every node of
    every evaluation stayed alive (12,649 here; a 320-parameter version held 4.3 GB)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4, 10))

    def loss(W, X):
        total = 0.0
        for x in X:
            for j in range(W.shape[1]):
                acc = _Node(0.0)
                for i in range(W.shape[0]):
                    w = float(W[i, j])  # concrete: JAX cannot trace this loss, the host runs it
                    acc = _Node(acc.data + w * x[i], (acc, _Node(w), _Node(x[i])))
                total += acc.data ** 2
        return total

    W = rng.normal(size=(10, 2)) * 0.1
    _Node.live = _Node.created = _Node.peak = 0
    assert jgc.check_grad(loss, W, X, grad=lambda W, X: 2 * X.T @ (X @ W)).ok
    assert _Node.created > 10_000
    assert _Node.peak < _Node.created / 4


def test_garbage_collector_restored_after_concurrent_checks():
    """Two checks tracing on two threads at once: the collector stays off until the last trace
    ends, and is back on after both."""
    ex = mlp("tanh")
    both_tracing = threading.Barrier(2)
    seen = []

    def loss(p, X, Y):
        if not seen:
            both_tracing.wait(timeout=60)  # the first trace of each check, at the same time
        seen.append(_automatic())
        return ex.loss(p, X, Y)

    def one(_):
        return jgc.check_grad(loss, ex.params, *ex.args, grad=ex.grad).ok

    assert _automatic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert all(pool.map(one, range(2)))
    assert seen and not any(seen)
    assert _automatic()


def test_user_arrays_never_mutated():
    ex = mlp("relu", xp=np)
    params = ex.params
    before = snapshot((params, ex.args))

    def mutating_grad(p, X, Y):
        g = ex.grad(p, X, Y)
        p["W1"] *= 0  # a gradient that scribbles on its inputs
        X[:] = 0
        return g

    jgc.check_grad(ex.loss, params, *ex.args, grad=mutating_grad)
    jgc.check_grad(ex.loss, params, *ex.args, grad=ex.bugs["b2_sign"].grad)
    jgc.numerical_grad(ex.loss, params, *ex.args)
    assert snapshot((params, ex.args)) == before


def test_x64_false_checks_at_user_precision():
    ex = mlp("tanh")
    p32 = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), ex.params)
    args32 = tuple(np.asarray(a, np.float32) for a in ex.args)
    r = jgc.check_grad(ex.loss, p32, *args32, grad=ex.grad, x64=False)
    assert r.precision == "float32"
    assert r.ok, str(r)
    r = jgc.check_grad(ex.loss, p32, *args32, grad=ex.bugs["b1_4_over_m"].grad, x64=False)
    assert [leaf.path for leaf in r.bad_leaves] == ["['b1']"]


def test_hidden_randomness_is_reported_as_such():
    ex = hidden_random_dropout()
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    assert not r.ok and r.verdict == "randomness"
    assert "hidden randomness" in r.diagnosis and "not a gradient bug" in r.diagnosis


def test_numerical_grad_matches_analytic():
    p = {"w": np.array([[0.3, -1.2], [2.0, 0.1]]), "c": 1.7, "k": 2}
    loss = lambda p: jnp.sum(jnp.sin(p["w"]) * p["c"] ** 2)
    g = jgc.numerical_grad(loss, p)
    np.testing.assert_allclose(g["w"], np.cos(p["w"]) * 1.7 ** 2, rtol=1e-9)
    np.testing.assert_allclose(g["c"], 2 * 1.7 * np.sum(np.sin(p["w"])), rtol=1e-9)
    assert g["k"] is None
    assert g["w"].dtype == np.float64


def test_sample_mode_is_seeded_and_reported():
    ex = mlp("tanh")
    r1 = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["W1_transposed"].grad,
                        mode="sample", samples=4, seed=3)
    r2 = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["W1_transposed"].grad,
                        mode="sample", samples=4, seed=3)
    assert r1.mode == "sample" and r1.leaf("['W1']").n_checked == 4
    assert r1.leaf("['b1']").n_checked == 4 and r1.leaf("['b2']").n_checked == 3
    assert any("sampled" in n for n in r1.notes)
    assert r1.leaf("['W1']").worst_index == r2.leaf("['W1']").worst_index
    assert not r1.ok


def test_second_check_compiles_nothing():
    ex = mlp("tanh")
    jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    other = jax.tree_util.tree_map(lambda v: v * 1.1, ex.params)
    with jax.log_compiles(), _count_compiles() as n:
        jgc.check_grad(ex.loss, other, *ex.args, grad=ex.grad)
    assert n() == 0
    # The positive control: a loss never seen compiles, and the counter sees it (it reads
    # JAX's log text, which could change; then this fails instead of the test passing blindly).
    changed = lambda p, X, Y: ex.loss(p, X, Y) + 0.5 * jnp.sum(p["b1"] ** 2)
    with jax.log_compiles(), _count_compiles() as n:
        jgc.check_grad(changed, other, *ex.args)
    assert n() > 0


class _count_compiles:
    def __enter__(self):
        import logging
        self.records = []
        handler = logging.Handler()
        handler.emit = lambda rec: self.records.append(rec.getMessage())
        self.handler = handler
        self.logger = logging.getLogger("jax")
        self.logger.addHandler(handler)
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        return lambda: sum("Compiling" in m for m in self.records)

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
