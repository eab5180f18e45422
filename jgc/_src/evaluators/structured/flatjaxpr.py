"""The loss's jaxpr as the structured pass reads it: flattened (nested calls and custom rules'
primal functions inlined), evaluated once for the base values, and costed in units of work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

# -- the flattened jaxpr ----------------------------------------------------------------------

CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
         "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a constant written into the jaxpr)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Eqn:
    prim: Any
    params: dict
    ins: tuple  # variable ids (int) or Lit
    outs: tuple[int, ...]  # variable ids; -1 for a dropped output
    shapes: tuple[tuple[int, ...], ...]  # output shapes
    dtypes: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Flat:
    """A jaxpr with every call inlined: inputs, constants, equations and outputs by id."""

    invars: tuple[int, ...]
    consts: tuple[tuple[int, Any], ...]  # (id, value): the closed jaxprs' constants
    eqns: tuple[Eqn, ...]
    outs: tuple  # ids or Lit
    avals: dict  # id -> jax.ShapeDtypeStruct
    n_top_consts: int  # the first consts are the closed jaxpr's own (passed at run time)

    @functools.cached_property
    def dense_cost(self) -> float:
        def shape(a):
            return np.shape(a.value) if isinstance(a, Lit) else self.avals[a].shape
        return sum(eqn_cost(e, [shape(a) for a in e.ins]) for e in self.eqns)


def flatten(closed) -> Flat:
    """Inlines nested calls (jit, custom_jvp/custom_vjp primal functions) into one list of
    equations over fresh integer ids."""
    counter = iter(range(1 << 62))
    consts, eqns, avals = [], [], {}

    def fresh(aval) -> int:
        i = next(counter)
        avals[i] = jax.ShapeDtypeStruct(tuple(aval.shape), aval.dtype)
        return i

    def walk(jaxpr, const_values, ins) -> list:
        local: dict = {}
        for v, c in zip(jaxpr.constvars, const_values):
            local[v] = fresh(v.aval)
            consts.append((local[v], c))
        for v, x in zip(jaxpr.invars, ins):
            local[v] = x

        def read(a):
            return Lit(a.val) if isinstance(a, jcore.Literal) else local[a]

        for e in jaxpr.eqns:
            args = [read(a) for a in e.invars]
            name = e.primitive.name
            if name in CALLS and CALLS[name] in e.params:
                inner = e.params[CALLS[name]]
                inner_consts = getattr(inner, "consts", ())
                inner = getattr(inner, "jaxpr", inner)
                outs = walk(inner, inner_consts, args)
                for v, o in zip(e.outvars, outs):
                    local[v] = o
                continue
            outs = []
            for v in e.outvars:
                if type(v).__name__ == "DropVar":
                    outs.append(-1)
                else:
                    local[v] = fresh(v.aval)
                    outs.append(local[v])
            eqns.append(Eqn(e.primitive, dict(e.params), tuple(args), tuple(outs),
                            tuple(tuple(v.aval.shape) for v in e.outvars),
                            tuple(v.aval.dtype for v in e.outvars)))
        return [read(a) for a in jaxpr.outvars]

    top = closed.jaxpr
    invars = [fresh(v.aval) for v in top.invars]
    outs = walk(top, closed.consts, invars)
    return Flat(tuple(invars), tuple(consts), tuple(eqns), tuple(outs), avals,
                len(closed.consts))


def _bind(eqn: Eqn, args):
    out = eqn.prim.bind(*args, **eqn.params)
    return list(out) if eqn.prim.multiple_results else [out]


def base_values(flat: Flat, inputs, consts, needed: tuple[int, ...]) -> tuple:
    """The unperturbed value of each id in `needed`: one forward pass (inside a program).
    `consts`: the closed jaxpr's own constants, passed at run time (never stale); those of
    inlined inner jaxprs are part of the trace."""
    env = dict(zip(flat.invars, inputs))
    env.update((i, c) for (i, _), c in zip(flat.consts, consts))
    env.update(flat.consts[len(consts):])
    for eqn in flat.eqns:
        outs = _bind(eqn, [a.value if isinstance(a, Lit) else env[a] for a in eqn.ins])
        env.update((i, o) for i, o in zip(eqn.outs, outs) if i >= 0)
    return tuple(env[i] for i in needed)


def depends(flat: Flat, source: int) -> tuple[set, list[Eqn]]:
    """The ids that depend on `source`, and the equations that read one, in order."""
    perturbed, eqns = {source}, []
    for eqn in flat.eqns:
        if any(isinstance(a, int) and a in perturbed for a in eqn.ins):
            eqns.append(eqn)
            perturbed.update(i for i in eqn.outs if i >= 0)
    return perturbed, eqns


def needed_ids(flat: Flat, eqns: list[Eqn]) -> tuple[int, ...]:
    """The base values the structured pass of a leaf reads: every operand and output of the
    equations it runs."""
    ids = set()
    for eqn in eqns:
        ids.update(a for a in eqn.ins if isinstance(a, int))
        ids.update(i for i in eqn.outs if i >= 0)
    return tuple(sorted(ids))


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def eqn_cost(eqn: Eqn, in_shapes) -> float:
    """Work of one evaluation of an equation, in multiply-adds or elements: a contraction's
    output times its contracted size, a convolution's output times its input features and
    window, a loop its body times its length, anything else its output."""
    return _cost(eqn.prim.name, eqn.params, in_shapes, eqn.shapes)


def _cost(name: str, params: dict, in_shapes, out_shapes) -> float:
    out = float(sum(_size(s) for s in out_shapes))
    if name == "dot_general":
        (lc, _), _ = params["dimension_numbers"]
        return out * _size([in_shapes[0][a] for a in lc])
    if name == "conv_general_dilated":
        spec = params["dimension_numbers"].rhs_spec
        return out * _size([in_shapes[1][a] for a in spec[1:]])
    if name == "scan":
        return params["length"] * jaxpr_cost(params["jaxpr"])
    if name == "cond":
        return max(jaxpr_cost(b) for b in params["branches"])
    if name == "while":  # an unknown number of trips: never cheaper than the dense pass
        return float("inf")
    inner = next((params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in params), None)
    return jaxpr_cost(inner) if inner is not None else out


def jaxpr_cost(jaxpr) -> float:
    """The work of one evaluation of a (closed) jaxpr: the sum of its equations' `_cost`."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return sum(_cost(e.primitive.name, e.params,
                     [tuple(getattr(v.aval, "shape", ())) for v in e.invars],
                     [tuple(getattr(v.aval, "shape", ())) for v in e.outvars])
               for e in jaxpr.eqns)


def dense_cost(flat: Flat) -> float:
    """What the dense evaluator computes per perturbation: every equation of the loss (the
    same for every leaf: computed once per flattened jaxpr)."""
    return flat.dense_cost
