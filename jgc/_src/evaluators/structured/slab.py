"""A perturbed array in the structured pass (`Slab`): its base value, the axes whose coordinates
differ per perturbation, and the values on that hyperplane; and the work counter the rules add to.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from jgc._src.evaluators.structured.flatjaxpr import _size

# -- the representation -----------------------------------------------------------------------

@dataclasses.dataclass
class Slab:
    """A perturbed array: `base` everywhere except on one hyperplane per perturbation (the
    coordinates `idx[c]` along the `fixed` axes), where it holds `val[c]`."""

    base: Any  # shape V
    fixed: tuple[int, ...]
    idx: Any  # (C, len(fixed)) int32, or None when nothing is fixed
    val: Any  # (C, *[V[a] for a not in fixed])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def spanned(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.fixed)

    def column(self, axis: int):
        return self.idx[:, self.fixed.index(axis)]


class Work:
    """Elements the structured rules produce per perturbation (filled while the structured
    program is traced abstractly), against what the dense evaluator computes per perturbation
    (`dense_cost`: the whole loss), for `plan_leaf`."""

    def __init__(self):
        self.structured = 0.0
        self.dense = 0.0
        self.materialized = 0.0  # elements made dense per perturbation (`dense`), for memory
        # Work a loop repeats over its steps (all but one step's), which does not add to what
        # a perturbation holds at once: the memory estimate leaves it out.
        self.repeated = 0.0
        self.fallbacks: list[str] = []


# The counter of the leaf being planned (`leafplan.plan_leaf`), None otherwise. A ContextVar, not
# a module-level list: checks run in several threads (jgc's worker pool, pytest-xdist, the
# user's own) each plan their leaves in their own context.
_WORK: contextvars.ContextVar[Work | None] = contextvars.ContextVar("jgc_structured_work",
                                                                    default=None)


@contextlib.contextmanager
def counting(work: Work) -> Iterator[Work]:
    """Within the block, the rules traced in this context add their work to `work`."""
    token = _WORK.set(work)
    try:
        yield work
    finally:
        _WORK.reset(token)


def _count(structured: float = 0.0, fallback: str | None = None,
           materialized: float = 0.0, repeated: float = 0.0) -> None:
    work = _WORK.get()
    if work is not None:
        work.structured += structured
        work.materialized += materialized
        work.repeated += repeated
        if fallback:
            work.fallbacks.append(fallback)


def hyper(x, fixed: tuple[int, ...], idx):
    """The values of an unperturbed array x on the hyperplanes: (C, *spanned), or x with a
    leading unit axis, (1, *shape), when nothing is fixed: it broadcasts against (C, *shape)
    with equal ranks, as jax_numpy_rank_promotion='raise' requires."""
    if not fixed:
        return x[None]
    moved = jnp.moveaxis(x, fixed, tuple(range(len(fixed))))
    return moved[tuple(idx[:, j] for j in range(len(fixed)))]


def dense(s: Slab):
    """The perturbed values in full, (C, *shape)."""
    if not s.fixed:
        return s.val
    _count(materialized=_size(s.shape))
    c = s.val.shape[0]
    full = jnp.broadcast_to(s.base, (c, *s.shape))
    front = tuple(range(1, 1 + len(s.fixed)))
    moved = jnp.moveaxis(full, tuple(a + 1 for a in s.fixed), front)
    moved = moved.at[(jnp.arange(c), *(s.idx[:, j] for j in range(len(s.fixed))))].set(s.val)
    return jnp.moveaxis(moved, front, tuple(a + 1 for a in s.fixed))


def delta(s: Slab):
    """The change on the hyperplanes, val - base, where the two differ: an entry equal to its
    base (a -inf mask the perturbation leaves alone) changes by 0, not by -inf - -inf = NaN."""
    base = hyper(s.base, s.fixed, s.idx)
    return jnp.where(s.val == base, jnp.zeros((), s.val.dtype), s.val - base)


def unfix_unit_axes(s: Slab) -> Slab:
    """Fixed axes of size 1 become spanned: their only coordinate is 0 for every perturbation."""
    unit = [a for a in s.fixed if s.shape[a] == 1]
    if not unit:
        return s
    fixed = tuple(a for a in s.fixed if a not in unit)
    idx = s.idx[:, [s.fixed.index(a) for a in fixed]] if fixed else None
    spanned = [a for a in range(len(s.shape)) if a not in fixed]
    val = s.val
    for a in sorted(unit):  # insert each unit axis at its place among the spanned axes
        val = jnp.expand_dims(val, 1 + spanned.index(a))
    return Slab(s.base, fixed, idx, val)


def fix_unit_axes(s: Slab, axes) -> Slab:
    """The converse: spanned `axes` of size 1 become fixed at coordinate 0 (a rule that needs
    them fixed, e.g. the only output channel of a convolution's kernel)."""
    unit = [a for a in axes if a not in s.fixed and s.shape[a] == 1]
    if not unit:
        return s
    c = s.val.shape[0]
    val = jnp.squeeze(s.val, tuple(1 + s.spanned.index(a) for a in unit))
    fixed = tuple(sorted((*s.fixed, *unit)))
    cols = [s.column(a) if a in s.fixed else jnp.zeros(c, jnp.int32) for a in fixed]
    return Slab(s.base, fixed, jnp.stack(cols, axis=1).astype(jnp.int32), val)


@dataclasses.dataclass
class Viewed:
    """A slab seen through a reshape that merges its fixed axes with spanned ones (a conv's
    (N, H, W, C) activations flattened to (N, H·W·C) for a dense layer): kept as the slab, so
    that a contraction over the merged axis can split the other operand instead (`dot_general`).
    Any other operation sees it densely."""

    inner: Slab
    shape: tuple[int, ...]
    groups: list  # the reshape's axis groups, [(inner axes, new axes)]
    base: Any


def as_slab(x):
    """A Viewed value as a plain (dense) slab; anything else unchanged."""
    if not isinstance(x, Viewed):
        return x
    v = dense(x.inner)
    _count(structured=_size(x.shape), fallback="reshape")
    return Slab(x.base, (), None, jnp.reshape(v, (v.shape[0], *x.shape)))


def _same_plane(a: Slab, b: Slab) -> bool:
    return a.fixed == b.fixed and (a.idx is b.idx or not a.fixed)
