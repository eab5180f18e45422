import gc

import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _config_unchanged():
    """Every test must leave the global JAX configuration, and Python's garbage collector (which
    a check pauses), as it found them."""
    state = lambda: (jax.config.jax_enable_x64, jax.config.jax_default_device, gc.isenabled(),
                     gc.get_threshold())
    before = state()
    yield
    assert state() == before


def snapshot(tree):
    """Byte-exact copies of every array leaf, to prove that nothing was mutated."""
    return [(np.asarray(x).dtype, np.asarray(x).shape, np.asarray(x).tobytes())
            for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")]


# A small smooth problem with a known gradient, shared by the trust and function tests.
RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3))
X = RNG.normal(size=(5, 4))


def tanh_loss(p, X):
    return jax.numpy.sum(jax.numpy.tanh(X @ p) ** 2)


def tanh_grad(p, X):
    t = np.tanh(X @ p)
    return X.T @ (2 * t * (1 - t ** 2))
