"""When no equation's rule is wrong: a piecewise definition at its boundary, or a NaN that
the program discards.

`where(x == 0, 0, x * log(y))` at x = 0 has correct rules everywhere: jax.grad differentiates
the branch the program takes (the constant 0, derivative 0), and every equation agrees with
finite differences at the values it received. The function itself is x log y on both sides, so
finite differences, which step off x = 0, see log y. What is wrong is the piecewise definition
at its boundary: a comparison on the parameters that changes within the step and selects
(select_n, cond) a branch whose derivative is not the function's.

`find` looks, in program order, for a comparison whose inputs depend on the parameters, whose
output reaches the loss, and whose outcome changes when its inputs move by the finite-difference
step (along the probes local.py uses), and names it and the select or cond it decides.

`nonfinite_origin` finds the other classic: `where(x < 1, log(1 - x), 0)` at x > 1 computes
log of a negative number in the branch not taken. The value is discarded, but the chain rule
multiplies the zero cotangent of that branch by the NaN it holds: jax.grad is NaN, while every
rule is right. The equation that first makes a NaN or Inf from finite inputs is named.
"""

from __future__ import annotations

import numpy as np

from jgc._src.localize import equations as eq
from jgc._src.localize.local import probes

COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
SELECTS = ("select_n", "cond")


def flips(unit: eq.Unit, varying: tuple[int, ...], seed: int) -> tuple[int, ...]:
    """The inputs of a comparison whose move by the step (h and h/512) changes its outcome."""
    xs = [np.asarray(unit.inputs[i]) for i in varying]
    if not xs:
        return ()
    rows, _, which = probes(varying, xs, np.random.default_rng(seed))
    before = np.asarray(unit.outputs[0])
    moved = set()
    for row, target in zip(rows, which):
        for mult in (1.0, -1.0, 1 / 512, -1 / 512):
            vals = list(unit.inputs)
            for i, r in zip(varying, row):
                vals[i] = np.asarray(vals[i]) + np.asarray(mult, r.dtype) * r
            if np.any(np.asarray(eq.bind(unit.eqn, vals)[0]) != before):
                moved.update(varying if target is None else (target,))
    return tuple(sorted(moved))


def consumer(tape: eq.Tape, unit: eq.Unit):
    """The select_n or cond that the comparison's outcome decides (through logical ops and
    conversions), or None."""
    derived = set(unit.out_ids)
    start = tape.items.index(unit)
    for item in tape.items[start + 1:]:
        if not any(i in derived for i in item.in_ids):
            continue
        if item.eqn is not None and item.eqn.primitive.name in SELECTS and (
                item.in_ids[0] in derived):
            return item
        derived.update(item.out_ids)
    return None


def nonfinite_origin(tape: eq.Tape, active: set, live: set):
    """The first equation, in program order, that makes a NaN or Inf from finite inputs
    that depend on the parameters, in a value that reaches the output; or None."""
    for unit in tape.units:
        if not any(i in active for i in unit.in_ids):
            continue
        if not all(np.isfinite(np.asarray(x)).all() for x in unit.inputs if eq.inexact(x)):
            continue
        if any(i in live and eq.inexact(x) and not np.isfinite(np.asarray(x)).all()
               for x, i in zip(unit.outputs, unit.out_ids)):
            return unit
    return None


def find(tape: eq.Tape, active: set, live: set, seed: int = 0):
    """(comparison unit, inputs that flip it, the select it decides) of the first comparison
    at its boundary, or None."""
    for k, unit in enumerate(tape.units):
        if unit.name not in COMPARISONS or not unit.out_ids or unit.out_ids[0] not in live:
            continue
        varying = tuple(i for i, (x, v) in enumerate(zip(unit.inputs, unit.in_ids))
                        if v in active and eq.inexact(x))
        moved = flips(unit, varying, seed + k)
        if moved:
            return unit, moved, consumer(tape, unit)
    return None

