import gc

import jax
import numpy as np
import pytest

# JAX at its strictest, as equinox's test suite sets it: no implicit rank promotion and no
# implicit dtype promotion, in jgc's own code and in the tests' (issue 22). A user may set
# both; jgc must then run unchanged (tests/test_strict.py compares it with the defaults).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# Two CPU devices, as equinox's conftest forces: the dense evaluator shards every chunk over
# jax.devices(), and a user's machine may have several. Set before JAX starts its backend (the
# first array), which nothing before this conftest does: `import jgc` does not import JAX.
jax.config.update("jax_num_cpu_devices", 2)


@pytest.fixture(autouse=True)
def _config_unchanged():
    """Every test must leave the global JAX configuration (precision, device, the two strict
    promotion modes above), and Python's garbage collector (which a check pauses), as it found
    them."""
    state = lambda: (jax.config.jax_enable_x64, jax.config.jax_default_device,
                     jax.config.jax_numpy_rank_promotion, jax.config.jax_numpy_dtype_promotion,
                     gc.isenabled(), gc.get_threshold())
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
