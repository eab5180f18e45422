"""The structured program for one leaf: its losses at one-entry perturbations or along whole-leaf
directions, and the plan that decides whether the leaf takes the structured pass at all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.evaluators.structured.flatjaxpr import (
    Eqn,
    Flat,
    Lit,
    _size,
    dense_cost,
    depends,
    needed_ids,
)
from jgc._src.evaluators.structured.loops import run
from jgc._src.evaluators.structured.slab import Slab, Work, as_slab, counting, dense
from jgc._src.stages.split import listing

# -- the program for one leaf -------------------------------------------------------------------

def leaf_losses(flat: Flat, eqns: list[Eqn], leaf_id: int, needed: tuple[int, ...], bases,
                leaf, index, step, dtype):
    """The flat outputs at leaf + step[c] e_{index[c]}, for every c: (C, n_out).

    `leaf` is the leaf's flat segment in the flat vector's dtype; the perturbed entry is
    fl(leaf[i] + s) cast to the leaf's evaluation dtype, exactly as the dense evaluator forms it.
    """
    env = dict(zip(needed, bases))
    val = (leaf[index] + step).astype(dtype)
    slab = Slab(env[leaf_id], (0,), index[:, None].astype(jnp.int32), val)
    return _outputs(flat, eqns, env, leaf_id, slab, index.shape[0])


def leaf_losses_dense(flat: Flat, eqns: list[Eqn], leaf_id: int, needed: tuple[int, ...],
                      bases, values):
    """The flat outputs with the leaf's segment replaced by each row of `values` (C, size):
    a perturbation of the whole leaf (a direction). Only the equations that depend on the leaf
    run, densely; everything upstream is read from `bases` (computed once per check)."""
    env = dict(zip(needed, bases))
    return _outputs(flat, eqns, env, leaf_id, Slab(env[leaf_id], (), None, values),
                    values.shape[0])


def _outputs(flat: Flat, eqns: list[Eqn], env: dict, leaf_id: int, slab: Slab, c: int):
    rep = run(eqns, env, {leaf_id: slab})
    values = []
    for o in flat.outs:
        if isinstance(o, int) and o in rep:
            values.append(jnp.reshape(dense(as_slab(rep[o])), (c, -1)))
        else:
            base = o.value if isinstance(o, Lit) else env[o]
            values.append(jnp.broadcast_to(jnp.reshape(base, (1, -1)),
                                           (c, _size(jnp.shape(base)))))
    return jnp.concatenate(values, axis=1)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Whether a leaf takes the structured pass, and what its program reads."""

    use: bool
    eqns: tuple
    needed: tuple[int, ...]
    structured: float  # work per perturbation (elements)
    dense: float
    fallbacks: tuple[str, ...]
    materialized: float = 0.0  # elements made dense per perturbation
    repeated: float = 0.0  # work a loop repeats over its steps (`Work.repeated`)


# The structured pass is taken where it does at most half the dense pass's work per
# perturbation: below that the gather and scatter overheads of its rules are not repaid.
ADVANTAGE = 2.0


def plan_leaf(flat: Flat, leaf_id: int, bases_avals: dict, leaf_aval, dtype) -> LeafPlan:
    """Traces the leaf's structured program abstractly (no compilation) and weighs its work
    against the dense pass's."""
    _, eqns = depends(flat, leaf_id)
    needed = needed_ids(flat, eqns)
    if leaf_id not in needed:
        needed = tuple(sorted({*needed, leaf_id}))
    work = Work()
    work.dense = dense_cost(flat)
    with counting(work):
        jax.eval_shape(
            lambda b, x, i, s: leaf_losses(flat, eqns, leaf_id, needed, b, x, i, s, dtype),
            tuple(bases_avals[i] for i in needed), leaf_aval,
            jax.ShapeDtypeStruct((1,), np.int32), jax.ShapeDtypeStruct((1,), leaf_aval.dtype))
    # A loop's repeated steps need no margin: they are the loop body's matrix products with
    # the weight shared by the chunk (`loops.scan`), where the dense pass multiplies by a copy
    # per perturbation. Measured on zoo.lstm_scan (float64, CPU, 2 cores; 1.3x less counted
    # work for Wx, Wh and b): its structured leaves ran 1.0x (Wh) to 3.9x (Wx) faster than
    # dense, never slower, and its full check 1.2x to 1.8x faster (loops.py's docstring).
    cost = (work.structured - work.repeated) * ADVANTAGE + work.repeated
    use = bool(np.isfinite(work.structured) and cost <= work.dense)
    return LeafPlan(use, tuple(eqns), needed, work.structured, work.dense,
                    tuple(work.fallbacks), work.materialized, work.repeated)


def cancellation(plan: LeafPlan, bases: dict) -> str | None:
    """Why leaf's structured pass must not be used, when a sum it carries a change through
    cancels: the terms summed are more than 1/sqrt(u) times the result, so it has lost more
    than half its digits to rounding. The pass adds the change of the perturbed terms to the
    sum's base value, where a plain evaluation rounds the whole sum again: two different
    roundings of a value that is mostly rounding, and the two paths' verdicts differed (terms of
    +-1e12 cancelling: the structured pass saw every small step round to no change at all). The
    dense path evaluates the loss as written, with the noise of its rounding measured."""
    for eqn in plan.eqns:
        if eqn.prim.name not in ("reduce_sum", "dot_general") or any(
                isinstance(a, Lit) or a not in bases for a in eqn.ins) or eqn.outs[0] not in bases:
            continue
        out = np.abs(np.asarray(bases[eqn.outs[0]], np.float64))
        ins = [np.abs(np.asarray(bases[a], np.float64)) for a in eqn.ins]
        if eqn.prim.name == "reduce_sum":
            terms = np.sum(ins[0], axis=tuple(eqn.params["axes"]))
        else:
            terms = _dot_general(ins[0], ins[1], eqn.params["dimension_numbers"])
        u = float(jnp.finfo(eqn.dtypes[0]).eps)
        # Over the sum's nonzero results (an exact 0, integer terms cancelling, has no rounding
        # to lose), and for most of them: a single result near zero in a layer is no
        # cancellation of the loss.
        nonzero = out > 0
        if not nonzero.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            lost = (terms * np.sqrt(u) / np.where(nonzero, out, 1.0))[nonzero]
        j = int(np.argmax(lost))
        if np.median(lost) > 1:
            return (f"a {eqn.prim.name} on its path cancels: terms of magnitude "
                    f"{terms[nonzero][j]:.1e} sum to {out[nonzero][j]:.1e}, more than half its "
                    "digits lost to rounding; finite differences then see the loss's rounding, "
                    "which only a plain evaluation reproduces")
    return None


def _dot_general(a: np.ndarray, b: np.ndarray, dimension_numbers) -> np.ndarray:
    """lax.dot_general's result in NumPy (einsum): on the host values the check already holds,
    without compiling a JAX program for each contraction (6 ms each, in a check of 0.5 s)."""
    (ca, cb), (ba, bb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    sa = [next(letters) for _ in range(a.ndim)]
    sb = [next(letters) for _ in range(b.ndim)]
    for i, j in zip((*ca, *ba), (*cb, *bb)):
        sb[j] = sa[i]
    # lax.dot_general's output: batch axes, then a's free axes, then b's.
    out = [sa[i] for i in ba] + [x for i, x in enumerate(sa) if i not in (*ca, *ba)] + [
        x for j, x in enumerate(sb) if j not in (*cb, *bb)]
    return np.einsum(f"{''.join(sa)},{''.join(sb)}->{''.join(out)}", a, b)


def describe(plans: dict[str, LeafPlan]) -> str:
    """Which leaves took the structured pass, for the report's notes."""
    used = [p for p, x in plans.items() if x.use]
    dense = [p for p, x in plans.items() if not x.use]
    text = ""
    if used:
        speed = [plans[p].dense / max(plans[p].structured, 1.0) for p in used]
        text = (f"structured evaluation (only what each perturbation changes is recomputed) for "
                f"{listing(used, 6)}: {_factor(min(speed), max(speed))} less work per "
                "perturbation")
    if dense:
        why = sorted({f for p in dense for f in plans[p].fallbacks[:1]})
        text += ("; " if text else "") + (
            f"dense evaluation for {listing(dense, 6)}"
            + (f" (the perturbation spreads at {', '.join(why[:3])})" if why else ""))
    return text


def _factor(low: float, high: float) -> str:
    """'12x', '3x to 40x'; the dense pass's work is unbounded with a while loop of unknown
    length that the structured pass runs once per check instead of once per perturbation."""
    if not np.isfinite(low):
        return "an unbounded factor (a while loop runs once per check, not per perturbation)"
    if not np.isfinite(high):
        return f"{low:.0f}x to an unbounded factor (a while loop runs once per check)"
    def x(v: float) -> str:  # a factor below 10 with one decimal: a loop's 1.3x is not 1x
        return f"{v:.1f}x" if v < 10 else f"{v:.0f}x"

    return x(low) if x(low) == x(high) else f"{x(low)} to {x(high)}"
