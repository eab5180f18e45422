"""What differs between the oldest JAX jgc supports (pyproject.toml) and the newest.

CI's second job (.ci/run, with .ci/constraints-min.txt) runs the test suite on the oldest
supported versions; everything else jgc uses is the same in all of them.
"""

try:  # a context manager over the jax_enable_x64 option: jax.enable_x64 since JAX 0.8
    from jax import enable_x64
except ImportError:  # JAX 0.7: the same context manager (removed in JAX 0.9)
    from jax.experimental import enable_x64

__all__ = ["enable_x64"]
