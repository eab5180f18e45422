"""Framework models with float32 data, for the verdict benchmark and the trust tests.

Each function returns a `Model`: a loss over framework parameters (a Flax params dict, an
Equinox module, a plain dict), its arguments, and the batch size. Flax and Equinox are imported
inside the functions that need them (they are test dependencies, not jgc's).

>>> from jgc.examples import zoo
>>> sorted(zoo.ZOO)
['attention', 'equinox_conv', 'equinox_mlp', 'flax_cnn', 'lstm_scan', 'norms', 'relu_ties']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    loss: Callable
    params: Any
    args: tuple
    batch: int
    description: str


def _f32(*arrays):
    return tuple(np.asarray(a, np.float32) for a in arrays)


def flax_cnn(size: str = "small", seed: int = 0) -> Model:
    """Flax linen CNN: conv 3x3 -> relu -> avg-pool 2, twice, then dense -> relu -> dense, with
    softmax cross-entropy. "mnist" is the Flax MNIST example (28x28, 32 and 64 channels, dense
    256: 824,458 parameters); "small" has the same layers on 12x12 images with 4 and 8
    channels (1,086 parameters), small enough for a full check."""
    import flax.linen as nn

    side, c1, c2, dense, batch = (28, 32, 64, 256, 4) if size == "mnist" else (12, 4, 8, 16, 4)

    def avg_pool(x):
        # nn.avg_pool(x, (2, 2), strides=(2, 2)), whose division by np.prod(window_shape), a
        # strongly typed integer, jax_numpy_dtype_promotion='strict' refuses: the same sum over
        # each window, divided by the same 4 as a (weakly typed) Python float.
        return nn.pool(x, 0.0, jax.lax.add, (2, 2), (2, 2), "VALID") / 4.0

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(features=c1, kernel_size=(3, 3))(x))
            x = avg_pool(x)
            x = nn.relu(nn.Conv(features=c2, kernel_size=(3, 3))(x))
            x = avg_pool(x)
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(features=dense)(x))
            return nn.Dense(features=10)(x)

    model = CNN()
    rng = np.random.default_rng(seed)
    (X,) = _f32(rng.random((batch, side, side, 1)))
    y = rng.integers(0, 10, batch)
    params = model.init(jax.random.PRNGKey(seed), X)["params"]

    def loss(p, X, y):
        logp = jax.nn.log_softmax(model.apply({"params": p}, X))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return Model(f"flax_cnn_{size}", loss, params, (X, y), batch,
                 f"Flax linen CNN ({size}), relu and avg-pool, cross-entropy")


def equinox_mlp(seed: int = 0) -> Model:
    """An eqx.nn.MLP (relu, 2 hidden layers of 16) passed whole: its activation functions are
    held fixed and reported as skipped."""
    import equinox as eqx

    rng = np.random.default_rng(seed)
    model = eqx.nn.MLP(6, 3, 16, 2, key=jax.random.PRNGKey(seed))
    X, Y = _f32(rng.normal(size=(16, 6)), rng.normal(size=(16, 3)))

    def loss(m, X, Y):
        return jnp.mean((jax.vmap(m)(X) - Y) ** 2)

    return Model("equinox_mlp", loss, model, (X, Y), 16, "eqx.nn.MLP 6-16-16-3, relu, MSE")


def equinox_conv(seed: int = 0) -> Model:
    """eqx.nn.Conv2d (2 -> 4 channels, 3x3) -> relu -> mean over space -> eqx.nn.Linear, split
    with eqx.partition (the static part passed as an argument)."""
    import equinox as eqx

    rng = np.random.default_rng(seed)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    net = (eqx.nn.Conv2d(2, 4, 3, key=k1), eqx.nn.Linear(4, 3, key=k2))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    X, Y = _f32(rng.normal(size=(6, 2, 7, 7)), rng.normal(size=(6, 3)))

    def loss(p, static, X, Y):
        conv, lin = eqx.combine(p, static)
        h = jax.vmap(lambda x: jax.nn.relu(conv(x)).mean(axis=(1, 2)))(X)
        return jnp.mean((jax.vmap(lin)(h) - Y) ** 2)

    return Model("equinox_conv", loss, params, (static, X, Y), 6,
                 "eqx.nn.Conv2d + relu + mean pool + eqx.nn.Linear, MSE")


def lstm_scan(seed: int = 0, d: int = 3, h: int = 8, T: int = 6, m: int = 4) -> Model:
    """An LSTM written with lax.scan over T steps (input d, hidden h, batch m), then a linear
    readout."""
    rng = np.random.default_rng(seed)
    params = {"Wx": rng.normal(size=(d, 4 * h)) / np.sqrt(d),
              "Wh": rng.normal(size=(h, 4 * h)) / np.sqrt(h),
              "b": rng.normal(size=4 * h) * 0.1, "Wo": rng.normal(size=(h, 2)) / np.sqrt(h)}
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    X, Y = _f32(rng.normal(size=(T, m, d)), rng.normal(size=(m, 2)))

    def loss(p, X, Y):
        def step(carry, x):
            hh, c = carry
            z = x @ p["Wx"] + hh @ p["Wh"] + p["b"][None, :]
            i, f, o, g = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            hh = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (hh, c), None

        zero = jnp.zeros((X.shape[1], h), X.dtype)
        (hh, _), _ = jax.lax.scan(step, (zero, zero), X)
        return jnp.mean((hh @ p["Wo"] - Y) ** 2)

    return Model("lstm_scan", loss, params, (X, Y), m, f"LSTM via lax.scan, {T} steps, MSE")


def attention(seed: int = 0, d: int = 6, T: int = 5, m: int = 3) -> Model:
    """Single-head self-attention with softmax over T tokens of width d, then a readout."""
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(rng.normal(size=(d, d)) / np.sqrt(d), np.float32)
              for k in ("Wq", "Wk", "Wv")}
    params["Wo"] = np.asarray(rng.normal(size=(d, 2)) / np.sqrt(d), np.float32)
    X, Y = _f32(rng.normal(size=(m, T, d)), rng.normal(size=(m, 2)))

    def loss(p, X, Y):
        q, k, v = X @ p["Wq"], X @ p["Wk"], X @ p["Wv"]
        a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(d), axis=-1)
        out = (a @ v).mean(axis=1) @ p["Wo"]
        return jnp.mean((out - Y) ** 2)

    return Model("attention", loss, params, (X, Y), m, "single-head self-attention, MSE")


def norms(seed: int = 0) -> Model:
    """Linear -> LayerNorm (scale, shift) -> tanh -> Linear -> BatchNorm (batch statistics) ->
    readout: both normalisations, with their learnable scales and shifts."""
    rng = np.random.default_rng(seed)
    d, h, m = 5, 7, 8
    params = {"W1": rng.normal(size=(d, h)) / np.sqrt(d), "g1": 1 + 0.1 * rng.normal(size=h),
              "s1": 0.1 * rng.normal(size=h), "W2": rng.normal(size=(h, h)) / np.sqrt(h),
              "g2": 1 + 0.1 * rng.normal(size=h), "s2": 0.1 * rng.normal(size=h),
              "Wo": rng.normal(size=(h, 2)) / np.sqrt(h)}
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    X, Y = _f32(rng.normal(size=(m, d)), rng.normal(size=(m, 2)))

    def loss(p, X, Y):
        z = X @ p["W1"]
        z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-5)
        z = jnp.tanh(p["g1"][None, :] * z + p["s1"][None, :]) @ p["W2"]
        z = (z - z.mean(0, keepdims=True)) / jnp.sqrt(z.var(0, keepdims=True) + 1e-5)
        return jnp.mean(((p["g2"][None, :] * z + p["s2"][None, :]) @ p["Wo"] - Y) ** 2)

    return Model("norms", loss, params, (X, Y), m, "LayerNorm and BatchNorm MLP, MSE")


def relu_ties(seed: int = 0) -> Model:
    """A relu MLP exactly at its kinks: integer inputs and weights, zero biases, so many units
    sit at z = 0 and some coordinates move several of them at once, in both directions."""
    rng = np.random.default_rng(seed)
    params = {"W1": rng.integers(-2, 3, size=(3, 4)), "b1": np.zeros(4),
              "W2": rng.normal(size=(4, 2)), "b2": np.zeros(2)}
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    X, Y = _f32(rng.integers(-2, 3, size=(8, 3)), rng.normal(size=(8, 2)))

    def loss(p, X, Y):
        h = jax.nn.relu(X @ p["W1"] + p["b1"][None, :])
        return 0.5 * jnp.mean((h @ p["W2"] + p["b2"][None, :] - Y) ** 2)

    return Model("relu_ties", loss, params, (X, Y), 8, "relu MLP at exact kinks (ties)")


def mlp(sizes=(784, 64, 10), batch: int = 32, seed: int = 0, dtype=np.float64) -> Model:
    """A tanh MLP with softmax cross-entropy on one-hot labels, parameters {"W0", "b0", ...}:
    the benchmarks' W1 (20-16-3, batch 8), W2 (784-64-10, batch 32) and the 4.2M network
    (3072-1024-1024-10). `mlp_grad` is its hand-written backprop in NumPy."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = np.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype)
        params[f"b{i}"] = np.asarray(0.1 * rng.normal(size=b), dtype)
    X = np.asarray(rng.normal(size=(batch, sizes[0])), dtype)
    Y = np.asarray(np.eye(sizes[-1])[rng.integers(0, sizes[-1], batch)], dtype)
    layers = len(sizes) - 1

    def loss(p, X, Y):
        h = X
        for i in range(layers):
            h = h @ p[f"W{i}"] + p[f"b{i}"][None, :]
            h = jnp.tanh(h) if i < layers - 1 else h
        return -jnp.sum(Y * jax.nn.log_softmax(h)) / X.shape[0]

    name = "mlp_" + "_".join(map(str, sizes))
    return Model(name, loss, params, (X, Y), batch,
                 f"tanh MLP {'-'.join(map(str, sizes))}, cross-entropy")


def mlp_grad(model: Model) -> Callable:
    """The hand-written (NumPy) gradient of an `mlp` model's loss."""
    layers = len(model.params) // 2

    def grad(p, X, Y):
        hs = [np.asarray(X)]
        for i in range(layers):
            z = hs[-1] @ p[f"W{i}"] + p[f"b{i}"]
            hs.append(np.tanh(z) if i < layers - 1 else z)
        e = np.exp(hs[-1] - hs[-1].max(1, keepdims=True))
        d = (e / e.sum(1, keepdims=True) * Y.sum(1, keepdims=True) - Y) / len(X)
        g = {}
        for i in reversed(range(layers)):
            g[f"W{i}"], g[f"b{i}"] = hs[i].T @ d, d.sum(0)
            if i:
                d = (d @ p[f"W{i}"].T) * (1 - hs[i] ** 2)
        return g

    return grad


ZOO = {"flax_cnn": flax_cnn, "equinox_mlp": equinox_mlp, "equinox_conv": equinox_conv,
       "lstm_scan": lstm_scan, "attention": attention, "norms": norms,
       "relu_ties": relu_ties}
