"""Reliability: every bad input gets a clear answer, nothing is lost or left changed.

Property tests (hypothesis) run over random pytrees and random smooth functions with known
gradients:
    f(θ) = Σ_i a_i sin(b_i θ_i) + c (Σ_i θ_i)**2,   a_i ∈ [-1, 1], b_i ∈ [0.5, 2], c ∈ [0, 0.1]
over θ_i ∈ [-2, 2] and at most 24 entries, so |f| <= 24 + 0.1·48**2 < 260 and |f'''| <= 8.
Stated bound for numerical_grad in float64 (h = u**(1/3)·max(1, |θ|) ≈ 6e-6·2): truncation
h**2 |f'''| / 6 < 2e-10, rounding about 16 u |f| / h < 2e-7; so |num - g| < 1e-6 always.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jgc
from jgc._src.surfaces import cli
from jgc.examples import mlp

# -- the CLI ----------------------------------------------------------------------------------

GOOD = """
import numpy as np, jax.numpy as jnp
rng = np.random.default_rng(0)
params = {"w": rng.normal(size=3)}
args = (rng.normal(size=(5, 3)),)
def loss(p, X):
    return jnp.sum(jnp.tanh(X @ p["w"]) ** 2)
def grad(p, X):
    t = np.tanh(X @ p["w"]); return {"w": X.T @ (2 * t * (1 - t ** 2))}
def bad(p, X):
    return {"w": 2 * grad(p, X)["w"]}
"""

FUZZ = {
    "syntax error": ("def loss(p:\n", "syntax error"),
    "raises on import": ("raise RuntimeError('boom')\n", "importing it raised RuntimeError"),
    "no loss": ("params = {'w': [1.0]}\n", "defines no `loss`"),
    "no params": ("def loss(p): return 0.0\n", "defines no `params`"),
    "loss not callable": ("loss = 3\nparams = {'w': 1.0}\n", "`loss` is a int, not a function"),
    "args not tuple": (GOOD + "args = [1, 2]\n", "`args` must be a tuple"),
    "params without floats": (GOOD + "params = {'n': 3}\n", "no floating-point leaves"),
    "loss raises": (GOOD + "def loss(p, X): raise ValueError('inside')\n",
                    "loss(params, *args) raised ValueError: inside"),
    "non-scalar loss": (GOOD + "def loss(p, X): return X @ p['w']\n", "must return a scalar"),
    "grad wrong shape": (GOOD + "def grad(p, X): return {'w': np.ones(4)}\n",
                         "has shape (4,) but params['w'] has shape (3,)"),
    "grad raises": (GOOD + "def grad(p, X): return 1 / 0\n", "raised ZeroDivisionError"),
    "grad missing key": (GOOD + "def grad(p, X): return {}\n", "has no entry in grad"),
    "empty file": ("", "defines no `loss`"),
    "binary junk": ("\x00\x01\x02", "error"),
    "sys.exit(0) at import": ("import sys\nsys.exit(0)\n",
                              "called sys.exit(0) while being imported, so nothing was checked"),
    "sys.exit(msg) at import": ("import sys\nsys.exit('bye')\n", "called sys.exit('bye')"),
    "aux without --has-aux": (GOOD + "def loss(p, X): return jnp.sum(p['w']), {'aux': 1}\n",
                              "pass has_aux=True (`jgc check --has-aux`"),
    "donated array": (GOOD + "params = {'w': jnp.zeros(3)}\nparams['w'].delete()\n",
                      "params['w'] is a deleted JAX array"),
    "zero-size params": (GOOD + "params = {'w': np.zeros((0, 3))}\n",
                         "every floating-point leaf is empty"),
}


def _cli(tmp_path, capsys, source, *extra):
    path = tmp_path / "user.py"
    path.write_text(source)
    code = cli.main(["check", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exit_status_0_and_1(tmp_path, capsys):
    code, out, err = _cli(tmp_path, capsys, GOOD)
    assert code == 0 and out.startswith("jgc gradient check: OK") and not err
    code, out, _ = _cli(tmp_path, capsys, GOOD, "--grad", "bad")
    assert code == 1 and "is 2× too large" in out
    code, out, _ = _cli(tmp_path, capsys, GOOD, "--json", "--no-x64", "--mode", "full")
    import json
    assert code == 0 and json.loads(out)["precision"] == "float32"


@pytest.mark.parametrize("case", FUZZ)
def test_cli_fuzz_gives_status_2_and_one_line(tmp_path, capsys, case):
    source, message = FUZZ[case]
    code, out, err = _cli(tmp_path, capsys, source)
    assert code == 2, (out, err)
    assert err.startswith("jgc: error: ") and message in err
    assert "Traceback" not in err and not out


def test_cli_inf_gradient_exits_1(tmp_path, capsys):
    code, out, _ = _cli(tmp_path, capsys, GOOD + "grad = {'w': np.full(3, np.inf)}\n")
    assert code == 1 and "non-finite entries (NaN or Inf)" in out


def test_cli_json_stdout_holds_only_the_document(tmp_path, capsys):
    """Prints at import and jax.debug.print inside the loss go to stderr."""
    import json
    src = ("print('hello from import')\n" + GOOD + "import jax\n"
           "def loss(p, X):\n    jax.debug.print('inside {}', jnp.sum(p['w']))\n"
           "    return jnp.sum(jnp.tanh(X @ p['w']) ** 2)\n")
    code, out, err = _cli(tmp_path, capsys, src, "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    assert "hello from import" in err and "inside" in err


def test_cli_has_aux(tmp_path, capsys):
    src = GOOD + "def loss(p, X): return jnp.sum(jnp.tanh(X @ p['w']) ** 2), {'n': 5}\n"
    code, out, _ = _cli(tmp_path, capsys, src, "--has-aux")
    assert code == 0 and out.startswith("jgc gradient check: OK")


def test_cli_interrupt_at_import_exits_130_without_traceback(tmp_path, capsys):
    code, out, err = _cli(tmp_path, capsys, "raise KeyboardInterrupt\n")
    assert code == 130 and err == "jgc: interrupted\n" and not out


def test_cli_directory_is_named(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory" in capsys.readouterr().err


def test_cli_method_choices_include_complex(tmp_path, capsys):
    # The data cast to the parameters' dtype: complex at the complex step, where real data
    # meeting them would be an implicit promotion (refused by the suite's strict dtype mode).
    src = GOOD + "def loss(p, X): return jnp.sum(jnp.tanh(X.astype(p['w'].dtype) @ p['w']) ** 2)\n"
    code, out, _ = _cli(tmp_path, capsys, src, "--method", "complex")
    assert code == 0 and "complex step" in out


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    path = tmp_path / "user.py"
    path.write_text(FUZZ["raises on import"][0])
    with pytest.raises(cli.UsageError):
        cli.main(["check", str(path), "--debug"])


def test_cli_missing_file_and_usage(capsys):
    assert cli.main(["check", "/nonexistent/x.py"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["check"])  # argparse: missing FILE
    assert e.value.code == 2


def test_cli_other_names(tmp_path, capsys):
    src = GOOD.replace("def loss(", "def my_loss(").replace("params =", "theta =")
    code, out, _ = _cli(tmp_path, capsys, src, "--loss", "my_loss", "--params", "theta")
    assert code == 0


# -- inputs are never changed, even on failure --------------------------------------------------

def test_mutating_grad_is_detected_and_arrays_are_intact():
    ex = mlp("tanh", xp=np)
    before = snapshot((ex.params, ex.args))

    def mutating(p, X, Y):
        g = ex.grad(p, X, Y)
        p["W1"] *= 0
        X[:] = 0
        return g

    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=mutating)
    assert r.ok
    assert "modified its inputs in place (params['W1'], args[0])" in r.notes[-1]
    assert "Warning: grad(params, *args) modified its inputs" in r.diagnosis
    assert snapshot((ex.params, ex.args)) == before


def test_nan_inputs_are_located():
    with pytest.raises(jgc.InputError, match=r"not finite: args\[0\] \(1 non-finite entry\)"):
        jgc.check_grad(lambda p, x: jnp.sum(p["w"] * x), {"w": np.ones(3)},
                       np.array([1.0, np.nan, 2.0]))
    with pytest.raises(jgc.InputError, match=r"params\['w'\] \(3 non-finite entries\)"):
        jgc.check_grad(lambda p: jnp.sum(p["w"]), {"w": np.full(3, np.inf)})
    with pytest.raises(jgc.InputError, match="Every input is finite, so the loss itself"):
        jgc.check_grad(lambda p: jnp.log(p["w"]).sum(), {"w": np.zeros(3)})


ERROR_CASES = [
    lambda p, x: jgc.check_grad(lambda p, x: x @ p["W"], p, x),
    lambda p, x: jgc.check_grad(lambda p, x: jnp.log(p["b"]).sum(), p, x),
    lambda p, x: jgc.check_grad(lambda p, x: p["nope"], p, x),
    lambda p, x: jgc.check_grad(lambda p, x: jnp.sum(p["W"]), p, x, grad={"W": 1}),
    lambda p, x: jgc.check_grad(lambda p, x: jnp.sum(p["W"]), p, x, grad=lambda p, x: 1 / 0),
    lambda p, x: jgc.check_grad(lambda p, x: jnp.sum(jnp.sqrt(p["b"])), p, x),
    lambda p, x: jgc.check_grad(lambda p, x: jnp.sum(p["W"]), p, x, mode="bad"),
    lambda p, x: jgc.check_grad(lambda p, x: jnp.sum(p["W"] @ x.T), p, x, memory_budget=1),
]


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
def test_failures_leave_arrays_and_config_unchanged(case, x64):
    p = {"W": np.ones((2, 3)), "b": np.zeros(3)}
    x = np.ones((4, 3))
    before = snapshot((p, x)), jax.config.jax_enable_x64
    with pytest.raises(jgc.InputError):
        ERROR_CASES[case](p, x)
    assert (snapshot((p, x)), jax.config.jax_enable_x64) == before


# -- properties -----------------------------------------------------------------------------

@st.composite
def smooth_problems(draw):
    """A random pytree of leaves and a random smooth function with its analytic gradient."""
    shapes = draw(st.lists(st.sampled_from([(), (1,), (3,), (2, 2), (4,), (2, 3)]),
                           min_size=1, max_size=4))
    nested = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    leaves = [rng.uniform(-2, 2, size=s) for s in shapes]
    a = [rng.uniform(-1, 1, size=s) for s in shapes]
    b = [rng.uniform(0.5, 2, size=s) for s in shapes]
    c = float(rng.uniform(0, 0.1))
    keys = [f"k{i}" for i in range(len(shapes))]
    params = ({"outer": [dict(zip(keys[::2], leaves[::2]))], "rest": leaves[1::2]} if nested
              else dict(zip(keys, leaves)))

    def flat(p):
        return ([p["outer"][0][k] for k in keys[::2]] + list(p["rest"]) if nested
                else [p[k] for k in keys])

    order = list(range(0, len(shapes), 2)) + list(range(1, len(shapes), 2)) if nested else \
        list(range(len(shapes)))

    def loss(p):
        xs = flat(p)
        total = sum(np.sum(x) for x in xs)
        return float(sum(np.sum(a[j] * np.sin(b[j] * x)) for j, x in zip(order, xs))
                     + c * total ** 2)

    def grad(p):
        xs = flat(p)
        total = sum(np.sum(x) for x in xs)
        gs = [a[j] * b[j] * np.cos(b[j] * x) + 2 * c * total for j, x in zip(order, xs)]
        if nested:
            n_even = len(keys[::2])
            return {"outer": [dict(zip(keys[::2], gs[:n_even]))], "rest": gs[n_even:]}
        return dict(zip(keys, gs))

    return params, loss, grad


PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(smooth_problems())
def test_numerical_grad_within_stated_bound(problem):
    params, loss, grad = problem
    num = jgc.numerical_grad(loss, params)
    for n, g in zip(jax.tree_util.tree_leaves(num), jax.tree_util.tree_leaves(grad(params))):
        assert np.all(np.abs(n - g) < 1e-6)


@PROPERTY
@given(smooth_problems())
def test_correct_gradients_are_never_flagged(problem):
    params, loss, grad = problem
    r = jgc.check_grad(loss, params, grad=grad)
    assert r.ok, str(r)


@PROPERTY
@given(smooth_problems(), st.integers(0, 10**6), st.floats(1e-4, 10.0),
       st.sampled_from([-1.0, 1.0]))
def test_planted_bugs_above_1e_4_are_always_caught(problem, where, size, sign):
    """Any single entry off by at least 1e-4·max(1, |g|) is caught, in the right leaf."""
    params, loss, grad = problem
    g = grad(params)
    leaves, treedef = jax.tree_util.tree_flatten(g)
    k = where % len(leaves)
    leaf = np.array(leaves[k], dtype=np.float64, copy=True)
    i = (where // len(leaves)) % leaf.size
    flat = leaf.reshape(-1)
    flat[i] += sign * size * max(1.0, abs(flat[i]))
    leaves[k] = flat.reshape(leaf.shape)
    r = jgc.check_grad(loss, params, grad=jax.tree_util.tree_unflatten(treedef, leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g)[0]]
    assert [x.path for x in r.bad_leaves] == [paths[k]]
