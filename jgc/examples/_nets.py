"""The example networks. Each backward takes `bug=None`; a named bug is a real backprop mistake
planted at the line where students and library authors make it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Bug:
    """A planted bug: the buggy gradient, the leaves it makes wrong, and its expected pattern."""

    grad: Callable
    wrong: tuple[str, ...]
    pattern: str | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Example:
    """loss(params, *args) with a correct hand-written `grad` and named `bugs`."""

    name: str
    loss: Callable
    params: dict
    args: tuple
    grad: Callable
    bugs: dict[str, Bug]
    description: str = ""


def _module(xp):
    if xp in (np, "numpy"):
        return np
    if xp in (jnp, "jax", "jax.numpy"):
        return jnp
    raise ValueError(f"xp={xp!r}: expected numpy or jax.numpy")


def _bugs(backward, specs) -> dict[str, Bug]:
    return {name: Bug(functools.partial(backward, bug=name), wrong, pattern, text)
            for name, (wrong, pattern, text) in specs.items()}


# -- MLP ------------------------------------------------------------------------------------

_ACT = {
    # name: (f(z), f'(z) written from the activation a = f(z), the classic cached form)
    "sigmoid": (lambda xp, z: 1 / (1 + xp.exp(-z)), lambda xp, z, a: a * (1 - a)),
    "tanh": (lambda xp, z: xp.tanh(z), lambda xp, z, a: 1 - a ** 2),
    "relu": (lambda xp, z: xp.maximum(z, 0), lambda xp, z, a: xp.where(z > 0, 1.0, 0.0)),
}
# The derivative mistakes people make: sigmoid' as a, tanh' as 1 - a, relu' forgotten.
_WRONG_ACT = {
    "sigmoid": lambda xp, z, a: a,
    "tanh": lambda xp, z, a: 1 - a,
    "relu": lambda xp, z, a: 1.0,
}


def mlp(activation: str = "tanh", xp=jnp, seed: int = 0, m: int = 8, width: int = 5,
        out: int = 3) -> Example:
    """Two-layer MLP, squared error: L = 1/(2m) Σ (act(X W1 + b1) W2 + b2 - Y)².

    The input width equals the hidden width so that W1 is square and a transposed gradient
    has the right shape (the bug a shape check cannot catch).
    """
    xp = _module(xp)
    act, dact = _ACT[activation]
    rng = np.random.default_rng(seed)
    params = {"W1": rng.normal(size=(width, width)) / np.sqrt(width),
              "b1": rng.normal(size=width) * 0.1,
              "W2": rng.normal(size=(width, out)) / np.sqrt(width),
              "b2": rng.normal(size=out) * 0.1}
    X, Y = rng.normal(size=(m, width)), rng.normal(size=(m, out))

    def loss(p, X, Y):
        h = act(xp, X @ p["W1"] + p["b1"][None, :])
        return ((h @ p["W2"] + p["b2"][None, :] - Y) ** 2).sum() / (2 * X.shape[0])

    def backward(p, X, Y, bug=None):
        m = X.shape[0]
        z1 = X @ p["W1"] + p["b1"][None, :]
        h = act(xp, z1)
        dout = h @ p["W2"] + p["b2"][None, :] - Y
        if bug != "missing_1_over_m":
            dout = dout / m
        dW2 = h.T @ dout
        db2 = -dout.sum(0) if bug == "b2_sign" else dout.sum(0)
        dh = dout @ p["W2"].T
        dz1 = dh * (_WRONG_ACT[activation] if bug == "act_derivative" else dact)(xp, z1, h)
        dW1 = dz1.T @ X if bug == "W1_transposed" else X.T @ dz1
        db1 = dz1.sum(0) * (4.0 if bug == "b1_4_over_m" else 1.0)  # 4./m instead of 1./m
        return {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}

    bugs = _bugs(backward, {
        "missing_1_over_m": (("['W1']", "['b1']", "['W2']", "['b2']"), "scale",
                             "the 1/m of the mean is dropped from dout"),
        "b2_sign": (("['b2']",), "sign", "db2 = -sum(dout)"),
        "act_derivative": (("['W1']", "['b1']"), None,
                           f"the derivative of {activation} is wrong"),
        "W1_transposed": (("['W1']",), "transpose", "dW1 = dz1.T @ X instead of X.T @ dz1"),
        "b1_4_over_m": (("['b1']",), "scale", "db1 computed with 4./m instead of 1./m"),
    })
    return Example(f"mlp_{activation}", loss, params, (X, Y), backward, bugs,
                   f"2-layer {activation} MLP, squared error, batch {m}")


# -- softmax cross-entropy with L2 ------------------------------------------------------------

def softmax_l2(xp=jnp, seed: int = 0, m: int = 10, dim: int = 4, classes: int = 3,
               reg: float = 0.1) -> Example:
    """Linear softmax classifier: mean cross-entropy + ½·reg·ΣW² (CS231n assignment 1)."""
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    params = {"W": rng.normal(size=(dim, classes)) * 0.5, "b": rng.normal(size=classes) * 0.1}
    X, y = rng.normal(size=(m, dim)), rng.integers(0, classes, size=m)

    def probs(p, X):
        s = X @ p["W"] + p["b"][None, :]
        e = xp.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def loss(p, X, y):
        onehot = xp.where(y[:, None] == xp.arange(p["W"].shape[1])[None, :], 1.0, 0.0)
        ce = -(xp.log(probs(p, X)) * onehot).sum() / X.shape[0]
        return ce + 0.5 * reg * (p["W"] ** 2).sum()

    def backward(p, X, y, bug=None):
        m = X.shape[0]
        onehot = xp.where(y[:, None] == xp.arange(p["W"].shape[1])[None, :], 1.0, 0.0)
        ds = probs(p, X) - (0.0 if bug == "no_onehot" else onehot)
        dW = X.T @ ds / m
        if bug != "reg_missing":
            dW = dW + (2 * reg if bug == "reg_doubled" else reg) * p["W"]
        db = ds.sum(0) if bug == "db_missing_1_over_m" else ds.sum(0) / m
        if bug == "db_never_computed":
            db = 0 * p["b"]  # initialised to zeros and never filled in
        return {"W": dW, "b": db}

    bugs = _bugs(backward, {
        "reg_missing": (("['W']",), "regularization", "the reg·W term is left out of dW"),
        "reg_doubled": (("['W']",), "regularization", "dW gets 2·reg·W for a ½·reg·W² loss"),
        "db_missing_1_over_m": (("['b']",), "scale", "db sums over the batch without 1/m"),
        "no_onehot": (("['W']", "['b']"), None, "the 1 is not subtracted at the true class"),
        "db_never_computed": (("['b']",), "zero", "db is left at its initial zeros"),
    })
    return Example("softmax_l2", loss, params, (X, y), backward, bugs,
                   f"softmax cross-entropy + L2 (reg={reg}), {classes} classes, batch {m}")


# -- conv + max-pool -------------------------------------------------------------------------

def _patches(xp, X, k):
    """(N, 1, H, W) -> (N, k*k, H-k+1, W-k+1): every k x k window, for a valid convolution."""
    h, w = X.shape[2] - k + 1, X.shape[3] - k + 1
    return xp.stack([X[:, 0, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=1)


def conv_maxpool(xp=jnp, seed: int = 0, n: int = 4, size: int = 6, channels: int = 2,
                 X=None) -> Example:
    """3x3 valid convolution, 2x2 max-pool, linear read-out, squared error.

    The max-pool backward routes each window's gradient to its maximum; at a tie it is split
    evenly between the tied entries, a value between the one-sided slopes.
    """
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    pooled_size = (size - 2) // 2
    feat = channels * pooled_size ** 2
    params = {"K": rng.normal(size=(channels, 9)) / 3, "bc": rng.normal(size=channels) * 0.1,
              "W": rng.normal(size=(feat, 1)) / np.sqrt(feat), "bw": np.zeros(1)}
    if X is None:
        X = rng.normal(size=(n, 1, size, size))
    Y = rng.normal(size=(X.shape[0], 1))

    def forward(p, X):
        P = _patches(xp, X, 3)
        Z = xp.einsum("nkij,ck->ncij", P, p["K"]) + p["bc"][None, :, None, None]
        N, C, H, W = Z.shape
        Zr = Z.reshape(N, C, H // 2, 2, W // 2, 2)
        pooled = Zr.max(axis=(3, 5))
        return P, Zr, pooled, pooled.reshape(N, -1) @ p["W"] + p["bw"][None, :]

    def loss(p, X, Y):
        return ((forward(p, X)[3] - Y) ** 2).sum() / (2 * X.shape[0])

    def backward(p, X, Y, bug=None):
        P, Zr, pooled, out = forward(p, X)
        N = X.shape[0]
        flat = pooled.reshape(N, -1)
        dout = (out - Y) / N
        dW, dbw = flat.T @ dout, dout.sum(0)
        dpooled = (dout @ p["W"].T).reshape(pooled.shape)
        if bug == "pool_routes_everywhere":  # the average-pool backward used for max-pool
            mask = xp.ones(Zr.shape) / 4
        else:
            mask = xp.where(Zr == pooled[:, :, :, None, :, None], 1.0, 0.0)
            mask = mask / mask.sum(axis=(3, 5), keepdims=True)
        dZ = (mask * dpooled[:, :, :, None, :, None]).reshape(N, Zr.shape[1], Zr.shape[2] * 2,
                                                              Zr.shape[4] * 2)
        dK = xp.einsum("nkij,ncij->ck", P, dZ)
        if bug == "dK_sign":
            dK = -dK
        dbc = dZ.mean(axis=(0, 2, 3)) if bug == "dbc_mean" else dZ.sum(axis=(0, 2, 3))
        return {"K": dK, "bc": dbc, "W": dW, "bw": dbw}

    bugs = _bugs(backward, {
        # The bias gradient sums the pooled gradient whichever way it is routed, so only the
        # kernel is wrong.
        "pool_routes_everywhere": (("['K']",), None,
                                   "max-pool backward spreads the gradient over the window"),
        "dK_sign": (("['K']",), "sign", "the kernel gradient has its sign flipped"),
        "dbc_mean": (("['bc']",), "scale", "the conv bias gradient averages instead of sums"),
    })
    return Example("conv_maxpool", loss, params, (X, Y), backward, bugs,
                   f"3x3 conv ({channels} channels) + 2x2 max-pool + linear, batch {n}")


# -- batchnorm -------------------------------------------------------------------------------

def batchnorm(xp=jnp, seed: int = 0, m: int = 8, dim: int = 3, hidden: int = 4) -> Example:
    """Linear -> batchnorm (batch statistics) -> tanh -> linear, squared error."""
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    eps = 1e-5
    params = {"W0": rng.normal(size=(dim, hidden)), "gamma": 1 + 0.1 * rng.normal(size=hidden),
              "beta": 0.1 * rng.normal(size=hidden), "W1": rng.normal(size=(hidden, 1)) / 2}
    X, Y = rng.normal(size=(m, dim)), rng.normal(size=(m, 1))

    def forward(p, X):
        z = X @ p["W0"]
        mu = z.mean(0, keepdims=True)
        var = ((z - z.mean(0, keepdims=True)) ** 2).mean(0, keepdims=True)
        inv_std = 1 / xp.sqrt(var + eps)
        xhat = (z - mu) * inv_std
        a = xp.tanh(p["gamma"][None, :] * xhat + p["beta"][None, :])
        return z, xhat, inv_std, a, a @ p["W1"]

    def loss(p, X, Y):
        return ((forward(p, X)[4] - Y) ** 2).sum() / (2 * X.shape[0])

    def backward(p, X, Y, bug=None):
        m = X.shape[0]
        z, xhat, inv_std, a, out = forward(p, X)
        dout = (out - Y) / m
        dW1 = a.T @ dout
        dy = (dout @ p["W1"].T) * (1 - a ** 2)
        dgamma = (dy * (z if bug == "dgamma_uses_z" else xhat)).sum(0)
        dbeta = dy.mean(0) if bug == "dbeta_mean" else dy.sum(0)
        dxhat = dy * p["gamma"][None, :]
        if bug == "dz_missing_mean_terms":  # treats the batch mean and variance as constants
            dz = dxhat * inv_std
        else:
            dz = inv_std / m * (m * dxhat - dxhat.sum(0, keepdims=True)
                                - xhat * (dxhat * xhat).sum(0, keepdims=True))
        return {"W0": X.T @ dz, "gamma": dgamma, "beta": dbeta, "W1": dW1}

    bugs = _bugs(backward, {
        "dz_missing_mean_terms": (("['W0']",), None,
                                  "the backward ignores that mean and variance depend on z"),
        "dgamma_uses_z": (("['gamma']",), None, "dgamma uses z instead of x̂"),
        "dbeta_mean": (("['beta']",), "scale", "dbeta averages over the batch"),
    })
    return Example("batchnorm", loss, params, (X, Y), backward, bugs,
                   f"linear + batchnorm + tanh + linear, batch {m}")


# -- RNN -------------------------------------------------------------------------------------

def rnn(xp=jnp, seed: int = 0, m: int = 4, steps: int = 5, dim: int = 3, hidden: int = 4
        ) -> Example:
    """Vanilla tanh RNN over `steps` steps, squared error on a read-out of the last state."""
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    params = {"Wx": rng.normal(size=(dim, hidden)) / 2, "Wh": rng.normal(size=(hidden, hidden)) / 2,
              "b": 0.1 * rng.normal(size=hidden), "Wy": rng.normal(size=(hidden, 1)) / 2}
    X, Y = rng.normal(size=(m, steps, dim)), rng.normal(size=(m, 1))

    def forward(p, X):
        hs = [xp.zeros((X.shape[0], p["Wh"].shape[0]))]
        for t in range(X.shape[1]):
            hs.append(xp.tanh(X[:, t] @ p["Wx"] + hs[-1] @ p["Wh"] + p["b"][None, :]))
        return hs, hs[-1] @ p["Wy"]

    def loss(p, X, Y):
        return ((forward(p, X)[1] - Y) ** 2).sum() / (2 * X.shape[0])

    def backward(p, X, Y, bug=None):
        hs, out = forward(p, X)
        dout = (out - Y) / X.shape[0]
        dWy = hs[-1].T @ dout
        dh = dout @ p["Wy"].T
        dWx, dWh, db = 0 * p["Wx"], 0 * p["Wh"], 0 * p["b"]
        for t in reversed(range(X.shape[1])):
            da = dh * (1 - hs[t + 1] ** 2)
            dWx = dWx + X[:, t].T @ da
            dWh = dWh + (da.T @ hs[t] if bug == "Wh_transposed" else hs[t].T @ da)
            db = db + da.sum(0)
            dh = 0 * dh if bug == "no_bptt" else da @ p["Wh"].T
        return {"Wx": dWx, "Wh": dWh, "b": db, "Wy": dWy}

    bugs = _bugs(backward, {
        "no_bptt": (("['Wx']", "['Wh']", "['b']"), None,
                    "the gradient is not propagated back through time"),
        "Wh_transposed": (("['Wh']",), "transpose", "dWh accumulates da.T @ h instead of h.T @ da"),
    })
    return Example("rnn", loss, params, (X, Y), backward, bugs,
                   f"tanh RNN, {steps} steps, batch {m}")


# -- dropout with the PRNG key as an argument -------------------------------------------------

def _dropout_mask(xp, key, shape, keep):
    if xp is np:  # NumPy flavour: the key is an integer seed, passed in like a JAX key.
        return (np.random.default_rng(key).random(shape) < keep) * 1.0
    return jnp.where(jax.random.bernoulli(key, keep, shape), 1.0, 0.0)


def dropout(xp=jnp, seed: int = 0, m: int = 8, dim: int = 4, hidden: int = 6,
            keep: float = 0.8) -> Example:
    """tanh MLP with inverted dropout on the hidden layer; the PRNG key is an argument, so every
    perturbed evaluation sees the same mask and the loss is an ordinary function of params."""
    xp = _module(xp)
    rng = np.random.default_rng(seed)
    params = {"W1": rng.normal(size=(dim, hidden)) / 2, "b1": 0.1 * rng.normal(size=hidden),
              "W2": rng.normal(size=(hidden, 1)) / 2, "b2": np.zeros(1)}
    X, Y = rng.normal(size=(m, dim)), rng.normal(size=(m, 1))
    key = seed + 1 if xp is np else jax.random.PRNGKey(seed + 1)

    def forward(p, X, key):
        a = xp.tanh(X @ p["W1"] + p["b1"][None, :])
        mask = _dropout_mask(xp, key, a.shape, keep) / keep
        return a, mask, (a * mask) @ p["W2"] + p["b2"][None, :]

    def loss(p, X, Y, key):
        return ((forward(p, X, key)[2] - Y) ** 2).sum() / (2 * X.shape[0])

    def backward(p, X, Y, key, bug=None):
        a, mask, out = forward(p, X, key)
        dout = (out - Y) / X.shape[0]
        dW2, db2 = (a * mask).T @ dout, dout.sum(0)
        dad = dout @ p["W2"].T
        if bug == "mask_not_scaled":
            dad = dad * mask * keep  # the 1/keep of inverted dropout forgotten in the backward
        elif bug != "mask_forgotten":
            dad = dad * mask
        dz = dad * (1 - a ** 2)
        return {"W1": X.T @ dz, "b1": dz.sum(0), "W2": dW2, "b2": db2}

    bugs = _bugs(backward, {
        "mask_not_scaled": (("['W1']", "['b1']"), "scale", "the backward drops the 1/keep"),
        "mask_forgotten": (("['W1']", "['b1']"), None, "the backward ignores the mask"),
    })
    return Example("dropout", loss, params, (X, Y, key), backward, bugs,
                   f"tanh MLP with dropout (keep={keep}), key passed as an argument")


def hidden_random_dropout(seed: int = 0) -> Example:
    """The dropout MLP with the mask drawn *inside* the loss from NumPy's global RNG: hidden
    randomness, which makes finite differences meaningless (jgc must say so)."""
    base = dropout(np, seed)

    def loss(p, X, Y):
        return base.loss(p, X, Y, int(np.random.randint(2**31)))

    def grad(p, X, Y):
        return base.grad(p, X, Y, int(np.random.randint(2**31)))

    return Example("hidden_random_dropout", loss, base.params, base.args[:2], grad, {},
                   "dropout drawing its own mask from np.random on every call")


# -- a custom_vjp rule with a wrong backward --------------------------------------------------

@jax.custom_vjp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


def _softplus_fwd(x):
    return _softplus(x), x


def _softplus_bwd(x, g):
    return (g * jnp.exp(-jnp.logaddexp(-x, 0.0)) * 2,)  # sigmoid(x), doubled by mistake


_softplus.defvjp(_softplus_fwd, _softplus_bwd)


def wrong_custom_vjp(seed: int = 0, m: int = 6, dim: int = 3) -> Example:
    """A linear layer followed by a softplus whose custom_vjp rule is 2x too large. Checked with
    grad=None, so jax.grad (and through it the rule) is what gets checked."""
    rng = np.random.default_rng(seed)
    params = {"W": rng.normal(size=(dim, 2)), "b": 0.1 * rng.normal(size=2),
              "scale": np.array(1.5)}
    X = rng.normal(size=(m, dim))

    def loss(p, X):
        return p["scale"] * _softplus(X @ p["W"] + p["b"][None, :]).mean()

    return Example("wrong_custom_vjp", loss, params, (X,), None, {},
                   "softplus with a custom_vjp whose backward is doubled; ['scale'] does not "
                   "pass through the rule, so only ['W'] and ['b'] are wrong")


ALL = {
    "mlp_sigmoid": functools.partial(mlp, "sigmoid"),
    "mlp_tanh": functools.partial(mlp, "tanh"),
    "mlp_relu": functools.partial(mlp, "relu"),
    "softmax_l2": softmax_l2,
    "conv_maxpool": conv_maxpool,
    "batchnorm": batchnorm,
    "rnn": rnn,
    "dropout": dropout,
}
