"""jgc under JAX's strictest promotion settings (issue 22): jax_numpy_rank_promotion='raise' and
jax_numpy_dtype_promotion='strict', which conftest.py sets for the whole suite.

jgc's own code states its broadcasts and casts, so a check runs the same under either setting
as under JAX's defaults: the structured evaluator and directional mode included, with the same
verdicts and values. The user's code runs under the user's settings: a loss that promotes
implicitly fails as it would without jgc, and jgc says what it raised and why.
"""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.evaluators import programs

SETTINGS = {  # name: (jax_numpy_rank_promotion, jax_numpy_dtype_promotion)
    "default": ("allow", "standard"),
    "rank": ("raise", "standard"),
    "dtype": ("allow", "strict"),
    "both": ("raise", "strict"),
}


@contextlib.contextmanager
def promotion(name: str):
    """JAX's promotion settings `name`, with a program cache of their own: every program a
    check runs is traced and compiled under them, none reused from a check under others."""
    rank, dtype = SETTINGS[name]
    saved = programs.CACHE
    programs.CACHE = programs._Cache(programs.CACHE_SIZE)
    try:
        with jax.numpy_rank_promotion(rank), jax.numpy_dtype_promotion(dtype):
            yield
            # A check leaves the settings it runs under as it found them.
            assert (jax.config.jax_numpy_rank_promotion,
                    jax.config.jax_numpy_dtype_promotion) == (rank, dtype)
    finally:
        programs.CACHE = saved


def fingerprint(report: jgc.Report) -> str:
    """Everything a report says (verdicts, values, notes, evaluations) but its wall time."""
    d = report.to_dict()
    del d["seconds"]
    return json.dumps(d, sort_keys=True)


# -- the structured evaluator and directional mode -------------------------------------------

def _mlp(sizes=(200, 120, 10), batch=16, seed=0):
    """A tanh MLP written with explicit broadcasts: 25,330 float64 parameters, enough for the
    structured evaluator."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = rng.normal(size=(a, b)) / np.sqrt(a)
        params[f"b{i}"] = 0.1 * rng.normal(size=b)
    X = rng.normal(size=(batch, sizes[0]))
    Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], batch)]

    def loss(p, X, Y):
        h = jnp.tanh(X @ p["W0"] + p["b0"][None, :])
        return -jnp.sum(Y * jax.nn.log_softmax(h @ p["W1"] + p["b1"][None, :])) / X.shape[0]

    return loss, params, (X, Y)


LOSS, PARAMS, ARGS = _mlp()


def one_percent_off(p, X, Y):
    """jax.grad with ['W1'] 1% too large."""
    g = jax.grad(LOSS)(p, X, Y)
    return {**g, "W1": g["W1"] * 1.01}


MODES = ("sample", "directional")


def _checks():
    return {mode: jgc.check_grad(LOSS, PARAMS, *ARGS, grad=one_percent_off, mode=mode)
            for mode in MODES}


@pytest.fixture(scope="module")
def under_defaults():
    with promotion("default"):
        return {mode: fingerprint(r) for mode, r in _checks().items()}


@pytest.mark.parametrize("setting", ["rank", "dtype", "both"])
def test_structured_and_directional_checks_are_unchanged_by_strict_promotion(setting,
                                                                             under_defaults):
    with promotion(setting):
        reports = _checks()
    for mode, r in reports.items():
        assert fingerprint(r) == under_defaults[mode], mode
        assert r.mode == mode and [leaf.path for leaf in r.bad_leaves] == ["['W1']"], str(r)
        assert r.leaf("['W1']").pattern == "scale"
        # Every leaf took the structured pass: none fell back to the dense one.
        (note,) = [n for n in r.notes if "structured evaluation" in n]
        assert note.startswith("structured evaluation (only what each perturbation changes is "
                               "recomputed) for ['W0'], ['W1'], ['b0'], ['b1']:"), note
        assert "dense evaluation" not in note
    assert all(leaf.directions == 2 for leaf in reports["directional"].leaves)


# -- every surface, on small problems -----------------------------------------------------------

def _mixed_outputs(x):
    """Outputs in three dtypes (float32, float64, int): jgc concatenates and contracts them."""
    return {"s": jnp.sin(x["a"]).astype(jnp.float32), "q": x["b"] ** 2,
            "n": jnp.argmax(x["a"])}


@jax.custom_vjp
def _square(x):
    return x ** 2


_square.defvjp(lambda x: (x ** 2, x), lambda x, g: (2 * x * g,))

_X = {"a": np.linspace(0.1, 1.0, 6), "b": np.linspace(-1.0, 1.0, 6)}
_Z = {"z": np.array([0.3 + 0.1j, -1.0 + 2.0j, 0.5 - 0.7j])}
_SMALL, _SMALL_P, _SMALL_ARGS = _mlp(sizes=(6, 5, 3), batch=4)
_P32 = {k: v.astype(np.float32) for k, v in _SMALL_P.items()}
_ARGS32 = tuple(a.astype(np.float32) for a in _SMALL_ARGS)

SURFACES = {
    "check_vjp, mixed output dtypes": lambda: jgc.check_vjp(_mixed_outputs, None, (_X,),
                                                            mode="full"),
    "check_jvp, mixed output dtypes": lambda: jgc.check_jvp(
        lambda x: {k: v for k, v in _mixed_outputs(x).items() if k != "n"}, None, (_X,),
        mode="full"),
    "check_hvp through a custom_vjp (reverse over reverse)": lambda: jgc.check_hvp(
        lambda x: jnp.sum(_square(x["a"]) * x["b"]), _X, mode="full"),
    "complex step": lambda: jgc.check_grad(
        lambda x: jnp.sum(jnp.sin(x["a"]) * x["b"] ** 3), _X, method="complex"),
    "complex parameters, directional": lambda: jgc.check_grad(
        lambda p: jnp.sum(jnp.abs(p["z"] ** 2 - 1j) ** 2), _Z, mode="directional"),
    "float32 at its own precision, Richardson": lambda: jgc.check_grad(
        _SMALL, _P32, *_ARGS32, x64=False, method="richardson"),
    "float32 promoted by x64, directional": lambda: jgc.check_grad(
        _SMALL, _P32, *_ARGS32, mode="directional"),
    "numerical_grad": lambda: jgc.numerical_grad(_SMALL, _SMALL_P, *_SMALL_ARGS),
}


def _result(value) -> str:
    if isinstance(value, jgc.Report):
        return fingerprint(value)
    return json.dumps(jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), value),
                      sort_keys=True)


@pytest.mark.parametrize("surface", SURFACES)
def test_every_surface_is_unchanged_by_strict_promotion(surface):
    with promotion("both"):
        strict = _result(SURFACES[surface]())
    with promotion("default"):
        default = _result(SURFACES[surface]())
    assert strict == default


# -- the user's code, under the user's settings --------------------------------------------------

W = {"W": np.full((3, 2), 0.1), "b": np.zeros(2)}
X = np.arange(12.0).reshape(4, 3) / 10


def bias_broadcast(p, x):  # rank promotion: (4, 2) + (2,)
    return jnp.sum(jnp.tanh(x @ p["W"] + p["b"]) ** 2)


def test_a_loss_that_promotes_ranks_is_refused_naming_what_it_raised():
    with promotion("default"):
        assert jgc.check_grad(bias_broadcast, W, X).ok
    with promotion("rank"), pytest.raises(jgc.InputError) as info:
        jgc.check_grad(bias_broadcast, W, X)
    msg = str(info.value)
    assert msg.startswith("loss raised ValueError: Operands could not be broadcast together for "
                          "add on shapes (4, 2) (2,)")
    assert ("That is an implicit rank promotion, which your JAX configuration forbids "
            "(jax_numpy_rank_promotion='raise')") in msg
    assert "b[None, :]" in msg and "set the option back to 'allow'" in msg
    assert "rank_promotion" in str(info.value.__cause__)  # the user's line stays visible


def test_a_gradient_function_that_promotes_is_refused_naming_it():
    def grad(p, x):  # JAX code: traced, not run on the host, where NumPy would broadcast
        t = jnp.tanh(x @ p["W"] + p["b"])
        d = 2 * t * (1 - t ** 2)
        return {"W": x.T @ d, "b": d.sum(0)}

    loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["W"] + p["b"][None, :]) ** 2)
    with promotion("default"):  # traced on a worker thread, under this thread's settings
        assert jgc.check_grad(loss, W, X, grad=grad).ok
    with promotion("both"), pytest.raises(jgc.InputError,
                                          match=r"^grad\(params, \*args\) raised ValueError: "
                                                r"Operands could not be broadcast"):
        jgc.check_grad(loss, W, X, grad=grad)


def test_a_float32_constant_meeting_x64s_float64_is_refused_with_the_way_out():
    """A float32 model that is strict-clean at its own precision: x64 promotes its parameters
    to float64, where its float32 constant meets them."""
    p32 = {k: v.astype(np.float32) for k, v in W.items()}
    x32 = X.astype(np.float32)
    loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["W"] + p["b"][None, :]) * jnp.float32(0.5))
    with promotion("dtype"):
        with pytest.raises(jgc.InputError) as info:
            jgc.check_grad(loss, p32, x32)
        assert jgc.check_grad(loss, p32, x32, x64=False).ok
    msg = str(info.value)
    # JAX names the two dtypes in the order of a set, which varies with PYTHONHASHSEED.
    assert msg.startswith(("loss raised TypePromotionError: Input dtypes ('float32', 'float64')",
                           "loss raised TypePromotionError: Input dtypes ('float64', 'float32')"))
    assert "(jax_numpy_dtype_promotion='strict')" in msg and "x.astype(y.dtype)" in msg
    assert "x64=False checks it at its own precision" in msg


def test_a_numpy_loss_still_runs_on_the_host_with_numpy_promotion():
    """Code that uses NumPy alone is not JAX's: its implicit broadcast is NumPy's, as when the
    user runs it."""
    loss = lambda p, x: np.sum(np.tanh(x @ p["W"] + p["b"]) ** 2)

    def grad(p, x):
        t = np.tanh(x @ p["W"] + p["b"])
        d = 2 * t * (1 - t ** 2)
        return {"W": x.T @ d, "b": d.sum(0)}

    with promotion("both"):
        r = jgc.check_grad(loss, W, X, grad=grad)
    assert r.ok, str(r)
    assert any("is not traceable by JAX" in n for n in r.notes)
