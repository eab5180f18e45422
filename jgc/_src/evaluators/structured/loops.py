"""Loops in the structured pass: `lax.scan` carried as slabs, step by step, and the rules a loop's
body needs beyond rules.py (a contraction of two perturbed operands, `split`).

A perturbation of a recurrent weight spreads over the steps: from the second step on, the whole
carry differs. The dense pass then runs the loop once per perturbation with its own copy of the
weight, so its contraction `carry @ W` is a batch of small matrix products, each reading its
own W (memory bound). Here the loop runs once per chunk with two carries, the base one and the
perturbed one (C, *carry): each step evaluates the body once on the base inputs (shared by the
chunk's C perturbations) and carries the perturbed values through the body's equations with
the same rules as the loss; `carry' @ W'` becomes `carry' @ W` (one matrix product with the
weight shared by every perturbation) plus the rank-1 change of the perturbed entry.

What it gains is bounded by the loop itself: once the carry differs everywhere, each
perturbation must redo every step's `carry @ W` and gate nonlinearities, which the dense pass
also does. Measured on zoo.lstm_scan (float64, CPU, 2 shared cores): per perturbation, the
structured pass ran Wh in 296 µs against dense's 369 µs and Wx in 269 µs against 595 µs
(d=32, h=128, T=16, m=8), where a bare jit loop of the same T matrix products and tanh runs
at 160 µs; the full check took 41 to 45 s against 67 to 71 s (1.5x to 1.7x), and 1.16 s
against 2.14 s for d=16, h=64, T=8, m=4 (a warm second run).

`while` has no rule: `fori_loop` with static bounds is already a scan, and a while loop's trip
count is unknown to the plan.

`apply` is rules.apply with these rules added; leafplan runs every equation through it, and the
scan rule runs its body through it (a scan in a scan works the same way).
"""

from __future__ import annotations

import dataclasses
import string

import jax.numpy as jnp
from jax import lax

from jgc._src.evaluators.structured import rules
from jgc._src.evaluators.structured.flatjaxpr import Eqn, Flat, Lit, _size, base_values, flatten
from jgc._src.evaluators.structured.slab import (
    _WORK,
    Slab,
    Viewed,
    Work,
    _count,
    as_slab,
    counting,
    delta,
    dense,
)


def apply(eqn: Eqn, ins, bases) -> list:
    """rules.apply, with the scan, split and two-slab contraction rules. An output the rule
    leaves unperturbed may come back as its plain base value (not a Slab)."""
    name = eqn.prim.name
    if any(isinstance(x, (Slab, Viewed)) for x in ins):
        if name == "scan":
            return scan(eqn, [as_slab(x) for x in ins], bases)
        if name == "split":
            return split(eqn, [as_slab(x) for x in ins], bases)
        if name == "dot_general" and all(isinstance(x, (Slab, Viewed)) for x in ins[:2]):
            out = dot_both(eqn, [as_slab(x) for x in ins], bases)
            if out is not None:
                return out
    return rules.apply(eqn, ins, bases)


def run(eqns, env: dict, rep: dict) -> dict:
    """The equations on their perturbed operands (`rep`: id -> slab) and base values (`env`):
    `rep` with every perturbed output added."""
    for eqn in eqns:
        ins = [a.value if isinstance(a, Lit) else rep.get(a, env.get(a)) for a in eqn.ins]
        if not any(isinstance(x, (Slab, Viewed)) for x in ins):
            continue  # its operands came out unperturbed (a scan's counter): so is it
        outs = apply(eqn, ins, [env[i] if i >= 0 else None for i in eqn.outs])
        for i, o in zip(eqn.outs, outs):
            if i >= 0 and isinstance(o, (Slab, Viewed)):
                rep[i] = o
    return rep


# -- scan ---------------------------------------------------------------------------------------

def _reach(body: Flat, sources: set) -> tuple[set, list[Eqn]]:
    """The body's ids that depend on `sources`, and the equations that read one."""
    perturbed, eqns = set(sources), []
    for eqn in body.eqns:
        if any(isinstance(a, int) and a in perturbed for a in eqn.ins):
            eqns.append(eqn)
            perturbed.update(i for i in eqn.outs if i >= 0)
    return perturbed, eqns


def scan(eqn: Eqn, ins, bases) -> list:
    """lax.scan with perturbed consts, carry or xs.

    The perturbed carry must keep one structure across the steps (lax.scan's carry has a fixed
    type): every carry component the perturbation reaches, by a fixed point over the body, is
    a dense slab (C, *shape) from the first step on. Perturbed consts stay the slabs they are
    (a one-hot weight keeps its one entry every step); perturbed xs are made dense and sliced
    per step. The base carry is recomputed alongside (the body's plain equations, once per step
    for the whole chunk), since the rules read the base value of every operand."""
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    body = flatten(p["jaxpr"])
    pert = {k for k, x in enumerate(ins) if isinstance(x, Slab)}
    while True:  # the fixed point: a carry the body's outputs perturb is perturbed on entry
        reached, eqns = _reach(body, {body.invars[k] for k in pert})
        more = {nc + j for j, o in enumerate(body.outs[:nk])
                if isinstance(o, int) and o in reached}
        if more <= pert:
            break
        pert |= more
    outs_pert = [isinstance(o, int) and o in reached for o in body.outs]
    if not any(outs_pert):
        return list(bases)
    first = next(x for x in ins if isinstance(x, Slab))
    c = first.val.shape[0]
    base_in = [x.base if isinstance(x, Slab) else jnp.asarray(x) for x in ins]
    carry_pos = [j for j in range(nk) if nc + j in pert]
    ys_pos = [j for j in range(nk, len(body.outs)) if outs_pert[j]]

    def full(k):  # input k's perturbed values in full, (C, *shape)
        x = ins[k]
        if isinstance(x, Slab):
            return dense(x)
        return jnp.broadcast_to(base_in[k], (c, *jnp.shape(base_in[k])))

    def cast(x, i):
        return x.astype(body.avals[body.invars[i]].dtype)

    init = ([cast(base_in[nc + j], nc + j) for j in range(nk)],
            [cast(full(nc + j), nc + j) for j in carry_pos])
    xs_k = range(nc + nk, len(ins))
    xs = ([base_in[k] for k in xs_k],
          [jnp.moveaxis(dense(ins[k]), 1, 0) for k in xs_k if k in pert])
    const_slabs = {body.invars[k]: ins[k] for k in range(nc) if k in pert}
    needed = sorted({*(a for e in eqns for a in e.ins if isinstance(a, int)),
                     *(i for e in eqns for i in e.outs if i >= 0),
                     *(o for o in body.outs if isinstance(o, int))} - set(body.invars))
    top = [v for _, v in body.consts[:body.n_top_consts]]

    def value(o, env):
        return o.value if isinstance(o, Lit) else env[o]

    def step(carry, x):
        base_carry, pert_carry = carry
        base_x, pert_x = x
        inputs = [*base_in[:nc], *base_carry, *base_x]
        env = dict(zip(body.invars, inputs))
        env.update(zip(needed, base_values(body, inputs, top, tuple(needed))))
        rep = dict(const_slabs)
        for j, v in zip(carry_pos, pert_carry):
            rep[body.invars[nc + j]] = Slab(env[body.invars[nc + j]], (), None, v)
        for k, v in zip([k for k in xs_k if k in pert], pert_x):
            rep[body.invars[k]] = Slab(env[body.invars[k]], (), None, v)
        rep = run(eqns, env, rep)

        def out(j):  # body output j's perturbed values in full
            o = body.outs[j]
            if isinstance(o, int) and o in rep:
                return dense(as_slab(rep[o]))
            b = value(o, env)
            return jnp.broadcast_to(b, (c, *jnp.shape(b)))

        new_base = [cast(jnp.asarray(value(body.outs[j], env)), nc + j) for j in range(nk)]
        new_pert = [cast(out(j), nc + j) for j in carry_pos]
        return (new_base, new_pert), [out(j) for j in ys_pos]

    work = Work()
    with counting(work):  # the body is traced once: its work counts `length` times
        (_, final), ys = lax.scan(step, init, xs, length=length, reverse=p["reverse"],
                                  unroll=p["unroll"])
    # The base body's evaluation is not counted: it runs once per step for the whole chunk
    # (hundreds of perturbations), as the loss's base values run once per check.
    stacked = sum(_size(body.avals[body.outs[j]].shape) for j in ys_pos if
                  isinstance(body.outs[j], int))
    _count(structured=length * work.structured, repeated=(length - 1) * work.structured
           + work.repeated, materialized=work.materialized + length * stacked)
    outer = _WORK.get()
    if outer is not None:
        outer.fallbacks.extend(work.fallbacks)
    result = list(bases)
    for j, v in zip(carry_pos, final):
        result[j] = Slab(bases[j], (), None, v)
    for j, v in zip(ys_pos, ys):
        result[j] = Slab(bases[j], (), None, jnp.moveaxis(v, 0, 1))
    return result


# -- rules a loop body needs ------------------------------------------------------------------

def split(eqn: Eqn, ins, bases) -> list:
    """`split` as one slice per output (the LSTM's gates from one pre-activation)."""
    (s,) = ins
    axis, outs, start = eqn.params["axis"], [], 0
    for size, shape, b in zip(eqn.params["sizes"], eqn.shapes, bases):
        lo = [0] * len(s.shape)
        hi = list(s.shape)
        lo[axis], hi[axis] = start, start + int(size)
        one = dataclasses.replace(eqn, params=dict(start_indices=tuple(lo),
                                                   limit_indices=tuple(hi), strides=None),
                                  shapes=(shape,))
        outs += rules.slice_(one, [s], [b])
        start += int(size)
    return outs


def dot_both(eqn: Eqn, ins, bases):
    """A contraction of two perturbed operands, A' and B' (the perturbed carry and a one-hot
    weight): A'·B' = A'·B + A'·(B' - B). The first term is the one-slab rule with B's base (a
    matrix product with the weight shared by every perturbation); the second contracts A' with
    B's change on its hyperplane, gathering A' at B's fixed coordinates (a rank-1 update for a
    one-hot B). The result is dense."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a_pos = 0 if len(ins[0].fixed) <= len(ins[1].fixed) else 1  # B: the more fixed one
    a, b = ins[a_pos], ins[1 - a_pos]
    first = rules.dot_general(eqn, [a, b.base] if a_pos == 0 else [b.base, a], bases)
    if first is None:
        return None
    ac, bc = (lc, rc) if a_pos == 0 else (rc, lc)
    ab, bb = (lb, rb) if a_pos == 0 else (rb, lb)
    pair = dict(zip(list(bc) + list(bb), list(ac) + list(ab)))  # B axis -> A axis
    c = b.val.shape[0]
    a_full = dense(a)
    gathered = [pair[x] for x in b.fixed if x in pair]
    cols = [b.column(x) for x in b.fixed if x in pair]
    moved = jnp.moveaxis(a_full, [1 + y for y in gathered], range(1, 1 + len(gathered)))
    a_sub = moved[(jnp.arange(c), *cols)] if gathered else a_full
    a_rest = [y for y in range(len(a.shape)) if y not in gathered]
    letters = iter(string.ascii_letters)
    c_letter = next(letters)
    a_letter = {y: next(letters) for y in a_rest}
    b_letter = {x: (a_letter[pair[x]] if x in pair else next(letters)) for x in b.spanned}
    a_free = [y for y in range(len(a.shape)) if y not in ac and y not in ab]
    b_free = [x for x in range(len(b.shape)) if x not in bc and x not in bb]
    out_axes = ([("a", y) for y in ab] + [("a", y) for y in a_free] + [("b", x) for x in b_free]
                if a_pos == 0 else
                [("a", y) for y in ab] + [("b", x) for x in b_free] + [("a", y) for y in a_free])
    spec_out, out_fixed, out_cols = c_letter, [], []
    for j, (side, x) in enumerate(out_axes):
        if side == "a" and x in gathered:  # a batch axis B fixes
            bx = next(z for z, y in pair.items() if y == x)
            out_fixed.append(j)
            out_cols.append(b.column(bx))
        elif side == "b" and x in b.fixed:
            out_fixed.append(j)
            out_cols.append(b.column(x))
        else:
            spec_out += a_letter[x] if side == "a" else b_letter[x]
    spec_a = c_letter + "".join(a_letter[y] for y in a_rest)
    spec_b = c_letter + "".join(b_letter[x] for x in b.spanned)
    dtype = eqn.dtypes[0]
    second = jnp.einsum(f"{spec_a},{spec_b}->{spec_out}", a_sub, delta(b),
                        precision=eqn.params.get("precision"),
                        preferred_element_type=dtype).astype(dtype)
    full = dense(first[0])
    if out_fixed:  # added on B's hyperplane of the output, in place
        front = tuple(range(1, 1 + len(out_fixed)))
        moved = jnp.moveaxis(full, tuple(1 + j for j in out_fixed), front)
        moved = moved.at[(jnp.arange(c), *out_cols)].add(second)
        full = jnp.moveaxis(moved, front, tuple(1 + j for j in out_fixed))
    else:
        full = full + second
    contracted = _size([b.shape[x] for x in b.spanned if x in pair])
    _count(structured=_size(second.shape[1:]) * max(1, contracted) + _size(eqn.shapes[0]))
    return [Slab(bases[0], (), None, full)]
