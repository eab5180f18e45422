"""Complex parameters and complex functions: JAX's convention, the conjugate bug, every surface.

The examples (jgc.examples.complex_nets) are hand-written in NumPy and in jax.numpy; each has a
correct gradient and planted bugs with the leaves they make wrong and their pattern.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import jgc
from jgc._src.report.vocab import Pattern
from jgc._src.stages.patterns import find_pattern
from jgc.examples import complex_nets as cn

# (dtype, x64): complex64 checked at its own precision, and complex128.
PRECISIONS = [(np.complex64, False), (np.complex128, True)]
EXAMPLES = sorted(cn.COMPLEX)


def _mismatched(r):
    return tuple(leaf.path for leaf in r.leaves if leaf.status == "mismatch")


# -- the convention -----------------------------------------------------------------------------

def test_numerical_grad_follows_jax_convention():
    loss = lambda z: jnp.abs(z) ** 2 + 3 * z.real
    z = np.complex128(1 + 2j)
    assert complex(jax.grad(loss)(z)) == 5 - 4j
    g = jgc.numerical_grad(loss, z)
    assert g.dtype == np.complex128
    np.testing.assert_allclose(g, 5 - 4j, rtol=1e-8)


def test_numerical_grad_dtypes_and_mixed_trees():
    loss = lambda p: jnp.sum(jnp.abs(p["z"]) ** 2 * p["w"]) + jnp.sum(p["w"] ** 2)
    p = {"z": np.array([1 + 2j, -0.5j], np.complex64), "w": np.array([1.0, 2.0], np.float32)}
    g32 = jgc.numerical_grad(loss, p, x64=False)
    g64 = jgc.numerical_grad(loss, p)
    assert g32["z"].dtype == np.complex64 and g32["w"].dtype == np.float32
    assert g64["z"].dtype == np.complex128  # x64 promotes complex64 to complex128
    want = jax.grad(loss)(jax.tree_util.tree_map(jnp.asarray, p))
    np.testing.assert_allclose(g64["z"], want["z"], rtol=1e-7)
    np.testing.assert_allclose(g32["z"], want["z"], rtol=1e-2)
    np.testing.assert_allclose(g64["w"], want["w"], rtol=1e-7)


def test_python_complex_scalar_and_user_arrays_untouched():
    z = np.array([1 + 1j, 2 - 1j])
    before = z.copy()
    r = jgc.check_grad(lambda z: jnp.sum(jnp.abs(z) ** 4), z)
    assert r.ok and np.array_equal(z, before)
    assert jgc.check_grad(lambda z: jnp.abs(z) ** 2, 1 + 2j).ok


# -- hand-written gradients: correct ones pass, planted bugs are caught in the right leaf --------

@pytest.mark.parametrize("dtype,x64", PRECISIONS)
@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_correct_gradients_pass(name, xp, dtype, x64):
    ex = cn.COMPLEX[name](xp=xp, dtype=dtype)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, x64=x64)
    assert r.ok and r.verdict == "ok", str(r)
    if xp is jnp:  # jax.grad, checked itself
        assert jgc.check_grad(ex.loss, ex.params, *ex.args, x64=x64).ok


@pytest.mark.parametrize("dtype,x64", PRECISIONS)
@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_planted_bugs_are_caught_in_the_right_leaf(name, xp, dtype, x64):
    ex = cn.COMPLEX[name](xp=xp, dtype=dtype)
    for bug_name, bug in ex.bugs.items():
        r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=bug.grad, x64=x64)
        assert r.verdict == "wrong_gradient", (bug_name, str(r))
        assert _mismatched(r) == bug.wrong, (bug_name, str(r))
        if bug.pattern is not None:
            assert {leaf.pattern for leaf in r.leaves if leaf.status == "mismatch"} == {
                bug.pattern}, (bug_name, str(r))


def test_conjugate_bug_is_explained():
    ex = cn.least_squares(xp=jnp)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["conjugate"].grad)
    leaf = r.leaves[0]
    assert (leaf.status, leaf.pattern, leaf.dtype, leaf.shape) == (
        "mismatch", "conjugate", "complex128", (4, 4))
    assert "complex conjugate" in r.diagnosis and "∂f/∂x − i·∂f/∂y" in r.diagnosis
    assert "jnp.conj" in r.diagnosis and "jax.grad agrees with finite differences" in r.diagnosis
    # The values are shown as complex numbers, the checked one the conjugate of the others.
    assert isinstance(leaf.checked, complex) and len(leaf.worst_index) == 2
    np.testing.assert_allclose(leaf.checked, np.conj(leaf.numerical), rtol=1e-6)
    np.testing.assert_allclose(leaf.autodiff, leaf.numerical, rtol=1e-6)
    text = str(r)
    assert "c128[4,4]" in text and "j  " in text
    assert "JAX's convention" in " ".join(r.notes)
    d = json.loads(json.dumps(r.to_dict()))
    assert set(d["leaves"][0]["checked"]) == {"real", "imag"}
    with pytest.raises(AssertionError, match="complex conjugate"):
        jgc.assert_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["conjugate"].grad)


def test_pytorch_convention_gradient_is_the_conjugate():
    """What a PyTorch user would port: .grad holds df/dx + i df/dy."""
    loss = lambda p: jnp.sum(jnp.abs(p["z"] - 1j) ** 2) + jnp.sum(p["w"] * p["z"].real)
    p = {"z": np.array([0.3 + 0.1j, -1.0 + 2.0j]), "w": np.array([0.5, -2.0])}
    torch_style = lambda p: {"z": 2 * (p["z"] - 1j) + p["w"].astype(p["z"].dtype),
                             "w": p["z"].real}
    r = jgc.check_grad(loss, p, grad=torch_style)
    assert _mismatched(r) == ("['z']",) and r.leaf("['w']").status == "ok"
    assert r.leaf("['z']").pattern == "conjugate"
    fixed = lambda p: {"z": np.conj(torch_style(p)["z"]), "w": p["z"].real}
    assert jgc.check_grad(loss, p, grad=fixed).ok


def test_gradient_forms():
    ex = cn.least_squares(xp=np)
    g = ex.grad(ex.params, *ex.args)
    # A ready pytree, and a flat vector in ravel_pytree order.
    assert jgc.check_grad(ex.loss, ex.params, *ex.args, grad=g).ok
    flat, _ = ravel_pytree(g)
    assert jgc.check_grad(ex.loss, ex.params, *ex.args, grad=np.asarray(flat)).ok
    # A real array for a complex parameter is read as a zero imaginary part: wrong, not refused.
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad={"Z": g["Z"].real})
    assert r.verdict == "wrong_gradient" and _mismatched(r) == ("['Z']",)


@pytest.mark.parametrize("mode", ["sample", "directional"])
def test_modes_on_complex_leaves(mode):
    ex = cn.least_squares(xp=np, n=12, m=16)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, mode=mode, samples=8)
    assert r.ok, str(r)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["conjugate"].grad, mode=mode,
                       samples=8)
    assert r.leaves[0].status == "mismatch" and r.leaves[0].pattern == "conjugate", str(r)
    # Both parts of every checked entry: each worst value is a whole complex number.
    assert all(np.isfinite(v.real) and np.isfinite(v.imag)
               for row in r.leaves[0].worst for v in row[1:3])


def test_structured_sized_complex_check():
    """Large enough for the structured pass (float64): complex leaves fall back to dense at the
    complex primitive, and the report says so."""
    ex = cn.least_squares(xp=jnp, n=102, m=8)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, mode="full")
    assert r.ok and r.n_params == 2 * 102 * 102


# -- custom_vjp, check_vjp and check_jvp -------------------------------------------------------

@pytest.mark.parametrize("dtype,x64", PRECISIONS)
def test_wrong_complex_custom_vjp_rule(dtype, x64):
    ex = cn.wrong_complex_custom_vjp(dtype=dtype)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, x64=x64)
    assert r.verdict == "wrong_gradient" and _mismatched(r) == ("['z']",), str(r)
    z = ex.params["z"]
    r = jgc.check_vjp(cn.times_modulus, None, (z,), x64=x64)
    assert not r.ok and _mismatched(r) == ("[0]",)
    right = lambda c, z: (cn.times_modulus_right(c, z),)
    assert jgc.check_vjp(lambda z: z * jnp.abs(z).astype(z.dtype), right, (z,), x64=x64).ok


@pytest.mark.parametrize("dtype,x64", PRECISIONS)
def test_check_vjp_complex(dtype, x64):
    rng = np.random.default_rng(1)
    z = (rng.normal(size=4) + 1j * rng.normal(size=4)).astype(dtype)
    w = rng.normal(size=4).astype(np.finfo(dtype).dtype)
    f = lambda z, w: jnp.sin(z) * w.astype(z.dtype) + jnp.conj(z) ** 2  # not holomorphic, w real
    right = lambda c, z, w: (c * jnp.cos(z) * w.astype(z.dtype) + jnp.conj(2 * c * jnp.conj(z)),
                             (c * jnp.sin(z)).real)
    conj = lambda c, z, w: (jnp.conj(right(c, z, w)[0]), right(c, z, w)[1])
    assert jgc.check_vjp(f, right, (z, w), x64=x64).ok
    assert jgc.check_vjp(f, None, (z, w), x64=x64).ok
    r = jgc.check_vjp(f, conj, (z, w), x64=x64)
    assert _mismatched(r) == ("[0]",) and r.leaves[0].pattern == "conjugate", str(r)
    # A given complex cotangent, and jax.vjp's own value for a holomorphic f: c f'(z).
    c = (rng.normal(size=4) + 1j * rng.normal(size=4)).astype(dtype)
    hol = lambda z: z ** 3
    assert jgc.check_vjp(hol, lambda c, z: (3 * c * z ** 2,), (z,), c, x64=x64).ok
    assert not jgc.check_vjp(hol, lambda c, z: (3 * jnp.conj(c) * z ** 2,), (z,), c,
                             x64=x64).ok


@pytest.mark.parametrize("dtype,x64", PRECISIONS)
def test_check_jvp_complex(dtype, x64):
    rng = np.random.default_rng(2)
    z = (rng.normal(size=3) + 1j * rng.normal(size=3)).astype(dtype)
    f = lambda z: jnp.exp(z) * jnp.abs(z).astype(z.dtype)  # complex output, not holomorphic
    right = lambda p, t: (f(p[0]), jax.jvp(f, p, t)[1])
    conj = lambda p, t: (f(p[0]), jnp.conj(jax.jvp(f, p, t)[1]))
    assert jgc.check_jvp(f, None, (z,), x64=x64).ok
    assert jgc.check_jvp(f, right, (z,), x64=x64, mode="full").ok
    r = jgc.check_jvp(f, conj, (z,), x64=x64)
    assert not r.ok and r.leaves[0].pattern == "conjugate", str(r)
    assert "conj() too many or too few" in r.diagnosis
    np.testing.assert_allclose(r.leaves[0].checked, np.conj(r.leaves[0].numerical), rtol=1e-2)
    # A complex tangent is the direction (Re t, Im t), unconjugated.
    t = (np.ones(3) * (0.5 - 1j)).astype(dtype)
    assert jgc.check_jvp(f, right, (z,), (t,), x64=x64).ok
    holo = lambda p, t: (jnp.exp(p[0]), jnp.exp(p[0]) * t[0])
    assert jgc.check_jvp(jnp.exp, holo, (z,), (t,), x64=x64).ok


# -- refusals -------------------------------------------------------------------------------

def test_refusals_name_the_problem():
    z = np.array([1 + 1j, 2.0])
    with pytest.raises(jgc.InputError, match="returned a complex one.*check_vjp"):
        jgc.check_grad(lambda z: jnp.sum(z ** 2), z)
    with pytest.raises(jgc.InputError, match=r"method='complex'.*cannot check complex param"):
        jgc.check_grad(lambda z: jnp.sum(jnp.abs(z) ** 2), {"z": z}, method="complex")
    with pytest.raises(jgc.InputError, match=r"\['z'\].*imaginary axis"):
        jgc.numerical_grad(lambda p: jnp.sum(jnp.abs(p["z"]) ** 2), {"z": z}, method="complex")
    with pytest.raises(jgc.InputError, match=r"tangents\[0\] is complex.*Pass a real tangent"):
        jgc.check_jvp(jnp.sin, None, (np.ones(2),), (np.ones(2) * 1j,))
    with pytest.raises(jgc.InputError, match="check_hvp does not take complex parameters"):
        jgc.check_hvp(lambda z: jnp.sum(jnp.abs(z) ** 4), z)


# -- the conjugate pattern itself -----------------------------------------------------------

@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(0, 2 ** 31 - 1))
def test_conjugate_pattern_is_recognised(n, seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=2 * n)
    d[1::2] += np.sign(d[1::2]) * 0.5  # imaginary parts clear of zero
    imag = np.arange(2 * n) % 2 == 1
    tol = np.full(2 * n, 1e-9)
    g = np.where(imag, -d, d)
    pattern, _ = find_pattern(g, d, rng.normal(size=2 * n), tol, (n, 2), False, imag=imag)
    assert pattern == Pattern.CONJUGATE
    # The negative is a sign flip, not a conjugate; the conjugate scaled is neither.
    assert find_pattern(-d, d, d, tol, (n, 2), False, imag=imag)[0] == Pattern.SIGN
    assert find_pattern(2 * g, d, np.zeros(2 * n), tol, (n, 2), False,
                        imag=imag)[0] != Pattern.CONJUGATE
