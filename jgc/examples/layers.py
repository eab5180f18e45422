"""CS231n-style layers in NumPy: `forward(...) -> (out, cache)` and `backward(dout, cache)`,
each with planted bugs, for checking a network layer by layer with `jgc.check_vjp`.

>>> import jgc
>>> from jgc.examples.layers import LAYERS
>>> layer = LAYERS["affine"]
>>> jgc.check_vjp(layer.f, layer.f_vjp, layer.primals).ok
True
>>> jgc.check_vjp(layer.f, layer.bugs["db_mean"].f_vjp, layer.primals).ok
False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


def affine_forward(x, w, b):
    out = x.reshape(x.shape[0], -1) @ w + b[None, :]
    return out, (x, w, b)


def affine_backward(dout, cache, bug=None):
    x, w, b = cache
    dx = (dout @ w.T).reshape(x.shape)
    dw = x.reshape(x.shape[0], -1).T @ dout
    db = dout.mean(axis=0) if bug == "db_mean" else dout.sum(axis=0)
    if bug == "dx_no_reshape_order":  # reshaped in Fortran order: entries land in wrong places
        dx = (dout @ w.T).reshape(x.shape, order="F")
    return dx, dw, db


def relu_forward(x):
    return np.maximum(x, 0), x


def relu_backward(dout, cache, bug=None):
    x = cache
    return (dout * ((dout > 0) if bug == "mask_on_dout" else (x > 0)),)


def sigmoid_forward(x):
    s = 1 / (1 + np.exp(-x))
    return s, s


def sigmoid_backward(dout, cache, bug=None):
    s = cache
    return (dout * (s if bug == "derivative_is_s" else s * (1 - s)),)


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=0, keepdims=True)
    var = x.var(axis=0, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    return gamma[None, :] * xhat + beta[None, :], (xhat, gamma, np.sqrt(var + eps))


def batchnorm_backward(dout, cache, bug=None):
    xhat, gamma, std = cache
    m = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma[None, :]
    if bug == "dx_ignores_batch_stats":
        dx = dxhat / std
    else:
        dx = (m * dxhat - dxhat.sum(axis=0, keepdims=True)
              - xhat * (dxhat * xhat).sum(axis=0, keepdims=True)) / (m * std)
    return dx, dgamma, dbeta


@dataclasses.dataclass(frozen=True)
class LayerBug:
    f_vjp: Callable
    wrong: tuple[str, ...]  # Paths "[i]" of the primals whose gradient is wrong.
    description: str


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    f: Callable  # f(*primals) -> out
    f_vjp: Callable  # f_vjp(dout, *primals) -> tuple of gradients
    primals: tuple
    bugs: dict[str, LayerBug]


def _layer(name, forward, backward, primals, bugs) -> Layer:
    def f(*xs):
        return forward(*xs)[0]

    def vjp(bug):
        return lambda dout, *xs: backward(dout, forward(*xs)[1], bug=bug)

    return Layer(name, f, vjp(None), primals,
                 {b: LayerBug(vjp(b), wrong, text) for b, (wrong, text) in bugs.items()})


def _make_layers(seed: int = 0) -> dict[str, Layer]:
    rng = np.random.default_rng(seed)
    return {
        "affine": _layer("affine", affine_forward, affine_backward,
                         (rng.normal(size=(4, 2, 3)), rng.normal(size=(6, 5)),
                          rng.normal(size=5)),
                         {"db_mean": (("[2]",), "db averages over the batch instead of summing"),
                          "dx_no_reshape_order": (("[0]",), "dx reshaped in the wrong order")}),
        "relu": _layer("relu", relu_forward, relu_backward, (rng.normal(size=(4, 5)),),
                       {"mask_on_dout": (("[0]",), "the mask is taken from dout, not x")}),
        "sigmoid": _layer("sigmoid", sigmoid_forward, sigmoid_backward,
                          (rng.normal(size=(3, 4)),),
                          {"derivative_is_s": (("[0]",), "sigmoid' taken as s, not s(1-s)")}),
        "batchnorm": _layer("batchnorm", batchnorm_forward, batchnorm_backward,
                            (rng.normal(size=(6, 3)) * 2 + 1, 1 + rng.normal(size=3) * 0.1,
                             rng.normal(size=3) * 0.1),
                            {"dx_ignores_batch_stats": (("[0]",),
                                                        "dx treats mean and var as constants")}),
    }


LAYERS = _make_layers()
