"""Every function a user has is checked or clearly refused (issue: "Every function a user has
is checked or clearly refused")."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RNG, W, X, tanh_grad, tanh_loss

import jgc

# -- (value, aux) losses -------------------------------------------------------------------------

def aux_loss(p, X):
    return tanh_loss(p, X), {"accuracy": 0.5, "h": jnp.tanh(X @ p)}


def test_loss_with_aux_needs_has_aux_and_says_so():
    with pytest.raises(jgc.InputError, match="pass has_aux=True"):
        jgc.check_grad(aux_loss, W, X)
    with pytest.raises(jgc.InputError, match="has_aux=True: loss must return a pair"):
        jgc.check_grad(tanh_loss, W, X, has_aux=True)


def test_loss_with_aux_is_checked():
    assert jgc.check_grad(aux_loss, W, X, has_aux=True).ok
    assert jgc.check_grad(aux_loss, W, X, has_aux=True, grad=tanh_grad).ok
    # the gradient jax.grad(has_aux=True) returns: (grad, aux)
    assert jgc.check_grad(aux_loss, W, X, has_aux=True,
                          grad=jax.grad(aux_loss, has_aux=True)).ok
    r = jgc.check_grad(aux_loss, W, X, has_aux=True, grad=lambda p, X: 2 * tanh_grad(p, X))
    assert not r.ok and r.leaves[0].factor == pytest.approx(2.0)
    np.testing.assert_allclose(jgc.numerical_grad(aux_loss, W, X, has_aux=True),
                               tanh_grad(W, X), rtol=1e-7)
    numpy_aux = lambda p, X: (np.sum(np.tanh(X @ p) ** 2), "aux")
    assert jgc.check_grad(numpy_aux, W, X, has_aux=True, grad=tanh_grad).ok


# -- callbacks, odd callables, transformations ----------------------------------------------------

def callback_loss(p, X):
    shape = jax.ShapeDtypeStruct((5, 3), p.dtype)
    y = jax.pure_callback(lambda z: np.tanh(np.asarray(z)), shape, X @ p)
    return jnp.sum(y ** 2)


def test_pure_callback_loss_is_evaluated_one_at_a_time():
    """On the suite's two CPU devices too: the one-at-a-time program runs on one device (over
    several, a host callback in it left XLA's all-reduce waiting: a deadlock)."""
    assert jax.device_count() > 1  # conftest.py: the case that deadlocked
    r = jgc.check_grad(callback_loss, W, X, grad=tanh_grad)
    assert r.ok, str(r)
    notes = " ".join(r.notes)
    assert "cannot be vmapped" in notes and "one at a time" in notes
    assert "jax.grad is not available as a third opinion" in notes
    bad = jgc.check_grad(callback_loss, W, X, grad=lambda p, X: -tanh_grad(p, X))
    assert bad.leaves[0].pattern == "sign"


def test_pure_callback_loss_with_grad_none_says_what_to_do():
    with pytest.raises(jgc.InputError, match="calls jax.pure_callback, which JAX cannot "
                                             "differentiate.*Pass your hand-written gradient"):
        jgc.check_grad(callback_loss, W, X)


@dataclasses.dataclass
class DataclassLoss:
    """A callable dataclass: unhashable (eq=True sets __hash__ to None)."""

    weights: np.ndarray

    def __call__(self, p, X):
        return tanh_loss(p, X) * jnp.sum(self.weights)


class ModuleLoss(eqx.Module):
    scale: jax.Array

    def __call__(self, p, X):
        return tanh_loss(p, X) * self.scale


def test_unhashable_callables_as_loss_and_gradient():
    loss = DataclassLoss(np.array([0.5, 0.25]))
    with pytest.raises(TypeError):
        hash(loss)
    assert jgc.check_grad(loss, W, X).ok
    grad = DataclassLoss(np.array([0.5, 0.25]))
    grad.__class__ = type("G", (DataclassLoss,),
                          {"__call__": lambda self, p, X: 0.75 * tanh_grad(p, X)})
    assert jgc.check_grad(loss, W, X, grad=grad).ok
    assert jgc.check_grad(ModuleLoss(jnp.asarray(2.0)), W, X).ok


@pytest.mark.parametrize("transform", [jax.jit, jax.grad, jax.vmap])
def test_check_inside_a_transformation_is_refused(transform):
    def inner(w):
        return jgc.check_grad(lambda p: jnp.sum(p ** 2), w).global_rel_error

    arg = W if transform is not jax.vmap else W[None]
    with pytest.raises(jgc.InputError, match="outside jax.jit, jax.grad, jax.vmap"):
        transform(inner)(arg)


def test_zero_size_params_are_refused_by_name():
    with pytest.raises(jgc.InputError, match=r"every floating-point leaf is empty \(\['a'\] "
                                             r"\(shape \(0, 3\)\), \['b'\] \(shape \(0,\)\)\)"):
        jgc.check_grad(lambda p: jnp.sum(p["a"]), {"a": np.zeros((0, 3)), "b": np.zeros(0)})


def test_deleted_array_is_refused_by_name():
    w = jnp.asarray(W)
    w.delete()
    with pytest.raises(jgc.InputError, match=r"params\['w'\] is a deleted JAX array"):
        jgc.check_grad(lambda p, X: jnp.sum(p["w"]), {"w": w}, X)
    x = jnp.asarray(X)
    x.delete()
    with pytest.raises(jgc.InputError, match=r"args\[0\] is a deleted JAX array"):
        jgc.check_grad(tanh_loss, W, x)


# -- the user's gradient is called once -----------------------------------------------------------

def test_numpy_gradient_of_numpy_loss_runs_exactly_once():
    calls = []

    def grad(p, X):
        calls.append(1)
        return tanh_grad(p, X)

    r = jgc.check_grad(lambda p, X: np.sum(np.tanh(X @ p) ** 2), W, X, grad=grad)
    assert r.ok and len(calls) == 1


def test_jax_and_numpy_gradients_of_a_jax_loss_each_run_once():
    """The gradient function is called once: JAX code traced and compiled, NumPy code (read from
    its code, here through a helper) called on the host, never traced first."""
    calls = []

    def jax_grad(p, X):
        calls.append(1)
        return jax.grad(tanh_loss)(p, X)

    assert jgc.check_grad(tanh_loss, W, X, grad=jax_grad).ok and len(calls) == 1
    calls.clear()

    def numpy_grad(p, X):
        calls.append(1)
        return tanh_grad(p, X)  # a NumPy helper from another module

    r = jgc.check_grad(tanh_loss, W, X, grad=numpy_grad)
    assert r.ok and len(calls) == 1
    assert not any("traceable" in n for n in r.notes), r.notes


class _NumpyGrad:
    """A callable object: its code cannot be read before calling it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, p, X):
        self.calls += 1
        return tanh_grad(p, X)


def test_a_gradient_whose_code_does_not_tell_is_traced_first_and_the_note_says_where():
    grad = _NumpyGrad()
    r = jgc.check_grad(tanh_loss, W, X, grad=grad)
    assert r.ok and grad.calls == 2
    note = next(n for n in r.notes if "is not traceable by JAX" in n)
    assert "it converts its inputs to NumPy at conftest.py:" in note, note
    assert "TracerArrayConversionError" not in note and "JAX's tracer had run it" in note


def test_numpy_code_is_read_from_names_helpers_and_closures():
    from jgc._src.evaluators.calls import numpy_code

    def helper(z):
        return np.maximum(z, 0)

    def hand(p, X):
        return X.T @ helper(X @ p)

    scale = np.float64(2.0)
    assert numpy_code(hand) and numpy_code(tanh_grad)
    assert numpy_code(lambda p, X: scale * np.tanh(p))
    assert not numpy_code(lambda p, X: jnp.tanh(p))
    assert not numpy_code(lambda p, X: np.tanh(p) + jnp.ones(1))  # both: traced first
    assert not numpy_code(lambda p, X: X.T @ p)  # neither: traced first
    assert not numpy_code(_NumpyGrad())


# -- jax.grad that cannot be taken ------------------------------------------------------------

@jax.custom_vjp
def broken(x):
    return jnp.sin(x)


def broken_fwd(x):
    return jnp.sin(x), x


def broken_bwd(x, g):
    return (g * jnp.cos(x) * [1.0, 2.0][5],)  # IndexError: the rule under test crashes


broken.defvjp(broken_fwd, broken_bwd)


def test_crashing_custom_vjp_backward_is_named_and_chained():
    with pytest.raises(jgc.InputError) as info:
        jgc.check_grad(lambda p, X: jnp.sum(broken(X @ p)), W, X)
    text = str(info.value)
    assert "the backward rule `broken_bwd` of a jax.custom_vjp function raised IndexError" in text
    assert "test_functions.py" in text and ".." not in text
    assert isinstance(info.value.__cause__, IndexError)  # the failing line stays visible


def test_numerical_grad_refuses_complex_step_on_non_analytic_loss():
    for loss in (lambda p: jnp.sum(jnp.abs(p)), lambda p: jnp.sum(p.real ** 2)):
        with pytest.raises(jgc.InputError, match="needs a complex-analytic loss"):
            jgc.numerical_grad(loss, W, method="complex")
    g = jgc.numerical_grad(lambda p: jnp.sum(jnp.sin(p)), W, method="complex")
    np.testing.assert_allclose(g, np.cos(W), rtol=1e-13)


# -- smaller points and wording ------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, -5, 0.5, True, "1GB", float("nan")])
def test_memory_budget_must_be_a_positive_number_of_bytes(budget):
    with pytest.raises(jgc.InputError, match=r"memory_budget=.*expected a positive number of "
                                             "bytes"):
        jgc.check_grad(tanh_loss, W, X, memory_budget=budget)
    assert jgc.check_grad(tanh_loss, W, X, memory_budget=2e9).ok


def test_errors_show_the_public_name():
    assert jgc.InputError.__module__ == "jgc"
    assert repr(jgc.InputError("x")).startswith("InputError(")
    with pytest.raises(jgc.InputError) as info:
        jgc.check_grad(tanh_loss, W, X, samples=0, mode="sample")
    assert info.type.__module__ + "." + info.type.__name__ == "jgc.InputError"


def test_nan_gradient_raises_no_numpy_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = jgc.check_grad(tanh_loss, W, X, grad=np.full_like(W, np.nan))
    assert not r.ok and r.leaves[0].pattern == "nonfinite"


@pytest.mark.parametrize("factor, words", [
    (1e300, "is 1e+300× too large"), (0.0, "is 0× the right value (almost zero)"),
    (-1e300, "has the wrong sign and is 1e+300× the right magnitude"),
    (1.002, "is 0.2% too large (a factor 1.002): a small relative error"),
    (0.995, "is 0.5% too small (a factor 0.995)"), (4.0, "is 4× too large"),
    (8.0, "a 1/m averaging factor is missing (m = 8, the batch size)")])
def test_factors_are_worded_for_any_size(factor, words):
    from jgc._src.report.explain import describe_factor
    text = describe_factor(factor, 8)
    assert words in text and len(text) < 300
    assert "1 where 1 was meant" not in text


def test_advice_never_repeats_what_the_check_did():
    """A leaf below resolution in float64: the advice must not say "check in float64"."""
    loss = lambda w: 1 + 1e-14 * jnp.sum(w)
    r = jgc.check_grad(loss, np.ones(3))
    assert "x64=True" not in r.diagnosis and "method='richardson'" in r.diagnosis
    r = jgc.check_grad(loss, np.ones(3), method="richardson")
    assert "x64=True" not in r.diagnosis and "method='richardson'" not in r.diagnosis


def test_check_vjp_names_leaves_by_key_or_field():
    import typing

    class Inputs(typing.NamedTuple):
        x: np.ndarray
        w: np.ndarray

    f = lambda x, w: x @ w
    f_vjp = lambda dy, x, w: (dy @ w.T, x.T @ dy)
    x, w = RNG.normal(size=(2, 3)), RNG.normal(size=(3, 4))
    r = jgc.check_vjp(f, f_vjp, {"x": x, "w": w})
    assert r.ok and sorted(leaf.path for leaf in r.leaves) == ["['w']", "['x']"]
    bad = jgc.check_vjp(f, lambda dy, x, w: {"x": dy @ w.T, "w": 2 * x.T @ dy}, {"x": x, "w": w})
    assert [leaf.path for leaf in bad.bad_leaves] == ["['w']"]
    assert bad.leaf("['w']").factor == pytest.approx(2.0)
    r = jgc.check_vjp(f, f_vjp, Inputs(x, w))
    assert r.ok and [leaf.path for leaf in r.leaves] == [".x", ".w"]
    bad = jgc.check_vjp(f, lambda dy, x, w: (-dy @ w.T, x.T @ dy), Inputs(x, w))
    assert [leaf.path for leaf in bad.bad_leaves] == [".x"] and bad.leaf(".x").pattern == "sign"
    with pytest.raises(jgc.InputError, match="a dict with the primals' keys, or a tuple"):
        jgc.check_vjp(f, lambda dy, x, w: [dy], {"x": x, "w": w})
