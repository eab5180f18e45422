"""The batched programs every traced evaluator compiles: the function at a chunk of one-entry
perturbations, along a chunk of directions, and at complex steps, mapped over the devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.evaluators import programs
from jgc._src.stages.split import flat_output

MAP_BATCH = 2  # large leaves: perturbations evaluated two at a time within a chunk


# The programs' index rows (perturbed entries, direction ranges) are int32 (`_padded`); the
# positions they are compared with are made in the same dtype, as jax_numpy_dtype_promotion=
# 'strict' has no implicit path between int32 and x64's default int64.
INDEX_DTYPE = np.int32


def _map(one, arrays, sequential: bool, batched: bool = True):
    """one(*row) over arrays shaped (devices, chunk, ...): vmapped over the devices axis (which
    is sharded across jax.devices()), and within a device either vmapped (small problems) or
    mapped sequentially in pairs (large leaves: a batched matmul whose weights differ per
    perturbation streams a fresh copy of them from memory each time, while a sequential map
    keeps one copy in cache; measured 2x faster on a 784x64 leaf). `batched=False` (a function
    that cannot be vmapped): one perturbation at a time, on one device."""
    if not batched:
        flat = [a.reshape(-1, *a.shape[2:]) for a in arrays]
        out = jax.lax.map(lambda row: one(*row), flat)
        return out.reshape(*arrays[0].shape[:2], *out.shape[1:])

    def per_device(*rows):
        if sequential:
            return jax.lax.map(lambda a: one(*a), rows, batch_size=MAP_BATCH)
        return jax.vmap(one)(*rows)

    return jax.vmap(per_device)(*arrays)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What shapes a batched program besides the trace: the segments and how rows map."""

    kind: str
    segments: tuple[tuple[int, int, str], ...]
    leaf: int | None
    sequential: bool
    batched: bool
    vector: bool


def _evaluate(traced, consts, parts, dynamic, st: _Static):
    parts = [p.astype(dt) for p, (_, _, dt) in zip(parts, st.segments)]
    outs = traced.evaluate(consts, *parts, *dynamic)
    if st.vector:
        return flat_output(outs)
    return jnp.reshape(outs[0], ())


def _with_leaf(value, segs, st: _Static) -> list:
    """The flat segments with the perturbed one replaced: `value` is the whole flat vector
    (st.leaf None) or the perturbed leaf's segment."""
    if st.leaf is None:
        return [value[a:b] for a, b, _ in st.segments]
    parts = list(segs)
    parts[st.leaf] = value
    return parts


def _program_losses_at(traced: programs.Traced, st: _Static):
    def run(consts, theta, dynamic, index, step):
        segs = [theta[a:b] for a, b, _ in st.segments]
        base = theta if st.leaf is None else segs[st.leaf]
        positions = jnp.arange(base.shape[0], dtype=INDEX_DTYPE)

        def one(i, s):
            value = base + jnp.where(positions == i, s, 0)
            return _evaluate(traced, consts, _with_leaf(value, segs, st), dynamic, st)

        return _map(one, (index, step), st.sequential, st.batched)

    return run


def _program_losses_along(traced: programs.Traced, st: _Static):
    """The function with checked leaf `leaf` (or the whole flat vector, leaf=None) at
    x + mult[j] * vectors[vid[j]] on entries lo[j]..hi[j]-1.

    The step vectors stay on the device; a row is four numbers. mult is +-1 or a power of two
    and the mask 0 or 1, so the perturbed value is fl(x + s) for the vector's own entry s,
    exactly as the host computes it when it predicts the change.
    """
    def run(consts, theta, dynamic, vectors, vid, mult, lo, hi):
        segs = [theta[a:b] for a, b, _ in st.segments]
        base = theta if st.leaf is None else segs[st.leaf]
        positions = jnp.arange(base.shape[0], dtype=INDEX_DTYPE)

        def one(v, c, a, b):
            value = _displaced(base, positions, vectors, v, c, a, b)
            return _evaluate(traced, consts, _with_leaf(value, segs, st), dynamic, st)

        return _map(one, (vid, mult, lo, hi), st.sequential, st.batched)

    return run


def _displaced(base, positions, vectors, v, c, a, b):
    """base + c * vectors[v] on entries a..b-1: one row of a direction batch. mult is +-1 or a
    power of two and the mask 0 or 1, so the value is fl(x + s) for the vector's own entry s."""
    return base + jnp.where((positions >= a) & (positions < b), c * vectors[v], 0)


def _program_complex(traced: programs.Traced, st: _Static):
    """Im loss(theta + i step[j] e_{index[j]}) / step[j]: the complex-step derivatives."""
    def run(consts, theta, dynamic, index, step):
        positions = jnp.arange(theta.shape[0], dtype=INDEX_DTYPE)

        def one(i, s):
            # Explicit casts, as standard promotion would make them (the step to theta's
            # complex dtype, the imaginary part to the step's): they hold under
            # jax_numpy_dtype_promotion='strict' too.
            z = theta + 1j * jnp.where(positions == i, s, 0).astype(theta.dtype)
            parts = [z[a:b] for a, b, _ in st.segments]
            out = _evaluate(traced, consts, parts, dynamic, st)
            return jnp.imag(out).astype(s.dtype) / s

        return _map(one, (index, step), False, st.batched)

    return run
