"""Complex-parameter examples with hand-written gradients, each correct and with planted bugs.

Every gradient is written in JAX's convention: for a real loss L and a complex parameter
z = x + iy, the gradient is dL/dx - i dL/dy, the G with dL = Re(sum(G * dz)) (no conjugate),
which is what jax.grad returns. The classic bug is the other convention, dL/dx + i dL/dy
(PyTorch's .grad): the conjugate. Written against an array module `xp` (numpy or jax.numpy),
like the real examples, in complex128 or complex64 (`dtype`).

>>> from jgc.examples import complex_nets
>>> sorted(complex_nets.COMPLEX)
['least_squares', 'modrelu', 'unitary']
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jgc.examples._nets import Example, _bugs, _module


def _cnormal(rng, shape, dtype, scale=1.0):
    return (scale * (rng.normal(size=shape) + 1j * rng.normal(size=shape))).astype(dtype)


def _real(dtype) -> np.dtype:
    return np.finfo(np.dtype(dtype)).dtype  # complex64 -> float32


def least_squares(xp=jnp, seed: int = 0, m: int = 8, n: int = 4,
                  dtype=np.complex128) -> Example:
    """Complex linear least squares, L = |A Z - B|² / m (Frobenius), Z complex (n, n).

    dL = (2/m) Re(sum(conj(R) * A dZ)) with R = A Z - B, so the gradient is
    G = (2/m) A^T conj(R). Bugs: the conjugate (2/m) A^H R (the dL/dx + i dL/dy convention),
    its transpose (a square Z hides it from shape checks), and the 2 of the square dropped.
    """
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    params = {"Z": _cnormal(rng, (n, n), dtype, 1 / np.sqrt(n))}
    A, B = _cnormal(rng, (m, n), dtype), _cnormal(rng, (m, n), dtype)

    def loss(p, A, B):
        R = A @ p["Z"] - B
        return (xp.abs(R) ** 2).sum() / A.shape[0]

    def backward(p, A, B, bug=None):
        m = A.shape[0]
        R = A @ p["Z"] - B
        G = (2.0 / m) * (A.T @ xp.conj(R))
        if bug == "conjugate":
            G = xp.conj(G)  # (2/m) A^H R: what PyTorch's .grad holds
        elif bug == "transposed":
            G = G.T
        elif bug == "missing_2":
            G = G / 2
        return {"Z": G}

    bugs = _bugs(backward, {
        "conjugate": (("['Z']",), "conjugate", "(2/m) A^H R: the dL/dx + i dL/dy convention"),
        "transposed": (("['Z']",), "transpose", "G.T: a square parameter hides it"),
        "missing_2": (("['Z']",), "scale", "d|r|² taken as conj(r) dr, without the 2"),
    })
    return Example("least_squares", loss, params, (A, B), backward, bugs,
                   "|A Z - B|² / m over a complex (4, 4) matrix")


def modrelu(xp=jnp, seed: int = 0, m: int = 6, d_in: int = 4, d_out: int = 3,
            dtype=np.complex128) -> Example:
    """A complex dense layer with a modReLU activation, squared error to a complex target.

    z = X W^T + b, h = relu(|z| + c) z / |z| (c real, one per unit), L = sum |h - T|² / m.
    Where |z| + c > 0, h = z + c z / |z|; with G_h = (2/m) conj(h - T) and u = z / |z|:
      G_z = G_h (1 + c/|z|) - (c/|z|³) Re(G_h z) conj(z),  dL/dc = sum_n Re(G_h u),
      G_W = G_z^T X,  G_b = sum_n G_z  (z is holomorphic in W and b).
    The data keep |z| + c away from 0 (the relu's kink) and z away from 0 (|z|'s).
    Bugs: the conjugate of G_W and G_b (the convention), the phase term of G_z dropped (a
    modReLU derived as if z/|z| were constant), and dL/dc from Im instead of Re.
    """
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    params = {"W": _cnormal(rng, (d_out, d_in), dtype, 0.5),
              "b": _cnormal(rng, (d_out,), dtype, 0.1),
              "c": (0.3 * rng.normal(size=d_out)).astype(_real(dtype))}
    X, T = _cnormal(rng, (m, d_in), dtype), _cnormal(rng, (m, d_out), dtype)

    def forward(p, X):
        z = X @ p["W"].T + p["b"][None, :]
        a = xp.abs(z)
        s = a + p["c"][None, :]
        return z, a, s, xp.maximum(s, 0).astype(z.dtype) * z / a.astype(z.dtype)

    def loss(p, X, T):
        return (xp.abs(forward(p, X)[3] - T) ** 2).sum() / X.shape[0]

    def backward(p, X, T, bug=None):
        m = X.shape[0]
        z, a, s, h = forward(p, X)
        active = s > 0
        Gh = (2.0 / m) * xp.conj(h - T)
        c = p["c"][None, :]
        Gz = Gh * (1 + c / a).astype(z.dtype)
        if bug != "phase_term":
            Gz = Gz - ((c / a ** 3) * (Gh * z).real).astype(z.dtype) * xp.conj(z)
        Gz = xp.where(active, Gz, 0)
        u = z / a.astype(z.dtype)
        dc = xp.where(active, (Gh * u).imag if bug == "c_imag" else (Gh * u).real, 0).sum(0)
        GW, Gb = Gz.T @ X, Gz.sum(0)
        if bug == "conjugate":
            GW, Gb = xp.conj(GW), xp.conj(Gb)
        return {"W": GW, "b": Gb, "c": dc}

    bugs = _bugs(backward, {
        "conjugate": (("['W']", "['b']"), "conjugate",
                      "conj of dW and db: the dL/dx + i dL/dy convention"),
        "phase_term": (("['W']", "['b']"), None,
                       "the derivative of z/|z| dropped: modReLU differentiated as a scaling"),
        "c_imag": (("['c']",), None, "dL/dc from Im(G_h u) instead of Re"),
    })
    return Example("modrelu", loss, params, (X, T), backward, bugs,
                   "complex dense layer + modReLU, squared error (mixed complex and real leaves)")


def unitary(xp=jnp, seed: int = 0, n: int = 4, dtype=np.complex128) -> Example:
    """A unitary-parameterised state preparation: U = D(theta) (I - K)^-1 (I + K), with K =
    (A - A^H)/2 skew-Hermitian (the Cayley transform, so U is unitary for any complex A) and
    D = diag(exp(i theta)); L = |U psi - phi|².

    With w = U psi, G_w = 2 conj(w - phi): dL/dtheta = -Im(G_w w). For v = C psi (C the Cayley
    factor, M = I - K): dC = M^-1 dK (I + C), so dL = Re(sum(P * dK)) with
    P = outer(M^-T G_v, psi + v) and G_v = G_w exp(i theta); through dK = (dA - dA^H)/2,
    G_A = (P - P^H)/2. Bugs: the conjugate of G_A, the 1/2 of K dropped (G_A = P - P^H), and
    the sign of dL/dtheta.
    """
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    params = {"A": _cnormal(rng, (n, n), dtype, 0.5),
              "theta": rng.uniform(-np.pi, np.pi, size=n).astype(_real(dtype))}
    psi, phi = _cnormal(rng, (n,), dtype), _cnormal(rng, (n,), dtype)
    eye = np.eye(n, dtype=dtype)

    def parts(p, psi):
        K = (p["A"] - xp.conj(p["A"]).T) / 2
        M = eye - K
        v = xp.linalg.solve(M, (eye + K) @ psi)
        return M, v, xp.exp(1j * p["theta"].astype(v.dtype)) * v

    def loss(p, psi, phi):
        return (xp.abs(parts(p, psi)[2] - phi) ** 2).sum()

    def backward(p, psi, phi, bug=None):
        M, v, w = parts(p, psi)
        Gw = 2 * xp.conj(w - phi)
        dtheta = -(Gw * w).imag
        Gv = Gw * xp.exp(1j * p["theta"].astype(Gw.dtype))
        P = xp.outer(xp.linalg.solve(M.T, Gv), psi + v)
        GA = P - xp.conj(P).T
        if bug != "missing_half":
            GA = GA / 2
        if bug == "conjugate":
            GA = xp.conj(GA)
        if bug == "theta_sign":
            dtheta = -dtheta
        return {"A": GA, "theta": dtheta}

    bugs = _bugs(backward, {
        "conjugate": (("['A']",), "conjugate", "conj(G_A): the dL/dx + i dL/dy convention"),
        "missing_half": (("['A']",), "scale", "the 1/2 of K = (A - A^H)/2 dropped"),
        "theta_sign": (("['theta']",), "sign", "dL/dtheta = +Im(G_w w)"),
    })
    return Example("unitary", loss, params, (psi, phi), backward, bugs,
                   "Cayley-unitary times phases applied to a state, squared distance")


@jax.custom_vjp
def times_modulus(z):
    """f(z) = z |z| (elementwise; not holomorphic), with a hand-written VJP that forgets a
    conjugate: the right rule is c |z| + Re(c z) conj(z) / |z|."""
    return z * jnp.abs(z).astype(z.dtype)


def _times_modulus_fwd(z):
    return times_modulus(z), z


def _times_modulus_bwd(z, c):
    a = jnp.abs(z).astype(z.dtype)
    return (c * a + (c * z).real.astype(z.dtype) * z / a,)  # wrong: z / |z|, not conj(z) / |z|


times_modulus.defvjp(_times_modulus_fwd, _times_modulus_bwd)


def times_modulus_right(c, z):
    """The right VJP of z |z| under JAX's convention (Re(c df) = Re(G dz))."""
    a = jnp.abs(z).astype(z.dtype)
    return c * a + (c * z).real.astype(z.dtype) * jnp.conj(z) / a


def wrong_complex_custom_vjp(seed: int = 0, n: int = 5, dtype=np.complex128) -> Example:
    """L = sum |times_modulus(z) - t|² + sum(s * |z|²): the custom_vjp rule is wrong in ['z'];
    ['s'] (real) does not pass through it. Checked with grad=None."""
    rng = np.random.default_rng(seed)
    params = {"z": _cnormal(rng, (n,), dtype), "s": (0.1 * rng.normal(size=n)).astype(
        _real(dtype))}
    t = _cnormal(rng, (n,), dtype)

    def loss(p, t):
        return (jnp.abs(times_modulus(p["z"]) - t) ** 2).sum() + (p["s"] * jnp.abs(p["z"]) ** 2
                                                                   ).sum()

    return Example("wrong_complex_custom_vjp", loss, params, (t,), None, {},
                   "z |z| with a custom_vjp that forgets a conjugate; only ['z'] is wrong")


COMPLEX = {"least_squares": least_squares, "modrelu": modrelu, "unitary": unitary}
