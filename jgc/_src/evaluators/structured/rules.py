"""One rule per primitive: how a perturbation is carried through an equation while keeping its
slab as narrow as the algebra allows; anything without a rule is made dense (`_dense`).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jgc._src.evaluators.structured.flatjaxpr import Eqn, _bind, _size, eqn_cost
from jgc._src.evaluators.structured.slab import (
    Slab,
    Viewed,
    _count,
    _same_plane,
    as_slab,
    delta,
    dense,
    fix_unit_axes,
    hyper,
    unfix_unit_axes,
)

# -- rules ------------------------------------------------------------------------------------

ELEMENTWISE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex conj convert_element_type
copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor
""".split())


def _dense(eqn: Eqn, ins, bases) -> list[Slab]:
    """Any primitive: every perturbed operand in full, the primitive vmapped over them."""
    args = [dense(x) if isinstance(x, Slab) else x for x in ins]
    axes = [0 if isinstance(x, Slab) else None for x in ins]
    shapes = [x.shape if isinstance(x, Slab) else jnp.shape(x) for x in ins]
    _count(structured=eqn_cost(eqn, shapes), fallback=eqn.prim.name)
    outs = jax.vmap(lambda *a: _bind(eqn, a), in_axes=axes)(*args)
    return [Slab(b, (), None, o) for b, o in zip(bases, outs)]


def _widen(x, shape):
    """An operand broadcast to the output's shape (jaxpr elementwise operations broadcast
    size-1 axes): a slab's size-1 axes become spanned, and its values are broadcast."""
    if not isinstance(x, Slab):
        return x if jnp.ndim(x) == 0 else jnp.broadcast_to(x, shape)
    if x.shape == tuple(shape):
        return x
    if not x.shape:  # a scalar operand (jaxprs allow them beside arrays)
        c = x.val.shape[0]
        val = jnp.broadcast_to(jnp.reshape(x.val, (c,) + (1,) * len(shape)), (c, *shape))
        return Slab(jnp.broadcast_to(x.base, shape), (), None, val)
    x = unfix_unit_axes(x)
    val = jnp.broadcast_to(x.val, (x.val.shape[0], *[shape[a] for a in x.spanned]))
    return Slab(jnp.broadcast_to(x.base, shape), x.fixed, x.idx, val)


def elementwise(eqn: Eqn, ins, bases) -> list[Slab] | None:
    ins = [_widen(x, eqn.shapes[0]) for x in ins]
    slabs = [x for x in ins if isinstance(x, Slab)]
    first = slabs[0]
    if not all(_same_plane(s, first) for s in slabs):
        slabs = [unfix_unit_axes(s) for s in slabs]
        first = slabs[0]
        ins = [unfix_unit_axes(x) if isinstance(x, Slab) else x for x in ins]
        if not all(_same_plane(s, first) for s in slabs):  # different hyperplanes (a carry
            # made dense plus a one-hot's column): every operand in full, as the fallback
            # would, without counting the operation as one the perturbation spreads at
            ins = [Slab(x.base, (), None, dense(x)) if isinstance(x, Slab) else x for x in ins]
            first = next(x for x in ins if isinstance(x, Slab))
    shape = first.val.shape
    args = []
    for x in ins:
        if isinstance(x, Slab):
            args.append(x.val)
        elif jnp.ndim(x) == 0:
            args.append(jnp.broadcast_to(x, shape))
        else:
            args.append(jnp.broadcast_to(hyper(x, first.fixed, first.idx), shape))
    _count(structured=_size(shape[1:]))
    outs = _bind(eqn, args)
    return [Slab(b, first.fixed, first.idx, o) for b, o in zip(bases, outs)]


def transpose(eqn: Eqn, ins, bases):
    (s,) = ins
    perm = eqn.params["permutation"]
    fixed = tuple(j for j, a in enumerate(perm) if a in s.fixed)
    idx = s.idx[:, [s.fixed.index(perm[j]) for j in fixed]] if fixed else None
    old_spanned = s.spanned
    order = [1 + old_spanned.index(perm[j]) for j in range(len(perm)) if j not in fixed]
    _count(structured=_size(s.val.shape[1:]))
    return [Slab(bases[0], fixed, idx, jnp.transpose(s.val, (0, *order)))]


def broadcast_in_dim(eqn: Eqn, ins, bases):
    s = unfix_unit_axes(ins[0])
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    fixed = tuple(dims[a] for a in s.fixed)
    out_spanned = [j for j in range(len(shape)) if j not in fixed]
    c = s.val.shape[0]
    val = lax.broadcast_in_dim(s.val, (c, *[shape[j] for j in out_spanned]),
                               (0, *[1 + out_spanned.index(dims[a]) for a in s.spanned]))
    _count(structured=_size(val.shape[1:]))
    return [Slab(bases[0], fixed, s.idx if fixed else None, val)]


def _groups(old: tuple[int, ...], new: tuple[int, ...]):
    """The axes of a reshape in groups whose sizes multiply to the same number:
    [(old axes, new axes)], or None when a reshape cannot be grouped (it always can for
    row-major reshapes of equal sizes). Size-1 axes join the group before them."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        ga, gb, pa, pb = [], [], 1, 1
        while True:
            if pa == pb and (ga or gb):  # a complete group: it takes the unit axes after it
                if i < len(old) and old[i] == 1:
                    ga.append(i)
                    i += 1
                elif j < len(new) and new[j] == 1:
                    gb.append(j)
                    j += 1
                else:
                    break
            elif (pa <= pb or j >= len(new)) and i < len(old):
                ga.append(i)
                pa *= old[i]
                i += 1
            elif j < len(new):
                gb.append(j)
                pb *= new[j]
                j += 1
            else:
                break
        if pa != pb:
            return None
        groups.append((ga, gb))
    return groups


def reshape(eqn: Eqn, ins, bases):
    if eqn.params.get("dimensions") is not None:
        return None
    s = unfix_unit_axes(ins[0])
    new = tuple(eqn.params["new_sizes"])
    groups = _groups(s.shape, new)
    if groups is None:
        return None
    fixed, cols = [], []
    for ga, gb in groups:
        kinds = {a in s.fixed for a in ga if s.shape[a] > 1}
        if len(kinds) > 1:  # a group mixes fixed and spanned axes: not a slab any more,
            # but a contraction over the merged axis can still see the slab (`Viewed`)
            return [Viewed(s, new, groups, bases[0])]
        if kinds == {True}:  # coordinates through the group's row-major index
            flat = 0
            for a in ga:
                flat = flat * s.shape[a] + (s.column(a) if a in s.fixed else 0)
            for b in reversed(gb):
                if new[b] > 1:
                    fixed.append(b)
                    cols.append((b, flat % new[b]))
                flat = flat // new[b]
    fixed = tuple(sorted(fixed))
    by_axis = dict(cols)
    idx = jnp.stack([by_axis[b] for b in fixed], axis=1).astype(jnp.int32) if fixed else None
    c = s.val.shape[0]
    val = jnp.reshape(s.val, (c, *[new[j] for j in range(len(new)) if j not in fixed]))
    _count(structured=_size(val.shape[1:]))
    return [Slab(bases[0], fixed, idx, val)]


def squeeze(eqn: Eqn, ins, bases):
    s = unfix_unit_axes(ins[0])
    dims = tuple(d % len(s.shape) for d in eqn.params["dimensions"])
    keep = [a for a in range(len(s.shape)) if a not in dims]
    fixed = tuple(keep.index(a) for a in s.fixed)
    val = jnp.squeeze(s.val, tuple(1 + s.spanned.index(a) for a in dims))
    return [Slab(bases[0], fixed, s.idx if fixed else None, val)]


def _reduce_spanned(eqn: Eqn, s: Slab, axes, bases):
    keep = [a for a in range(len(s.shape)) if a not in axes]
    fixed = tuple(keep.index(a) for a in s.fixed)
    params = dict(eqn.params, axes=tuple(1 + s.spanned.index(a) for a in axes))
    val = eqn.prim.bind(s.val, **params)
    _count(structured=_size(s.val.shape[1:]))
    return [Slab(bases[0], fixed, s.idx if fixed else None, val)]


def reduce(eqn: Eqn, ins, bases):
    """reduce_sum/max/min/prod over spanned axes reduce `val`; reduce_sum over a fixed axis
    adds the change on the hyperplane to the output's base (linearity)."""
    s = ins[0]
    axes = tuple(eqn.params["axes"])
    if not any(a in s.fixed for a in axes):
        return _reduce_spanned(eqn, s, axes, bases)
    if eqn.prim.name in ("reduce_max", "reduce_min"):
        return _reduce_extreme(eqn, unfix_unit_axes(s), axes, bases)
    if eqn.prim.name != "reduce_sum":
        return None
    keep = [a for a in range(len(s.shape)) if a not in axes]
    fixed = tuple(keep.index(a) for a in s.fixed if a not in axes)
    idx = s.idx[:, [s.fixed.index(keep[f]) for f in fixed]] if fixed else None
    change = delta(s)
    spanned_axes = tuple(1 + s.spanned.index(a) for a in axes if a not in s.fixed)
    change = jnp.sum(change, axis=spanned_axes) if spanned_axes else change
    val = hyper(bases[0], fixed, idx) + change.astype(eqn.dtypes[0])
    _count(structured=_size(s.val.shape[1:]))
    return [Slab(bases[0], fixed, idx, val)]


def _reduce_extreme(eqn: Eqn, s: Slab, axes, bases):
    """reduce_max/min over fixed axes (log-softmax's max over the classes, with one class
    perturbed): each perturbation changes one coordinate j of the reduced fixed axes, so the
    new max is max(v, the base's max over every other coordinate), and the latter is the
    base's largest value unless j holds it, then its second largest (a tie gives the same
    value twice). A max is exact: the value equals the dense one bit for bit."""
    if not any(a in s.fixed for a in axes):
        return _reduce_spanned(eqn, s, axes, bases)
    big = eqn.prim.name == "reduce_max"
    keep = [a for a in range(len(s.shape)) if a not in axes]
    red_fixed = [a for a in s.fixed if a in axes]
    red_spanned = tuple(a for a in axes if a not in s.fixed)
    m = s.base if not red_spanned else eqn.prim.bind(s.base, axes=red_spanned,
                                                      **_extra(eqn.params))
    # m over (kept axes, reduced fixed axes) with the reduced fixed axes flattened last
    left = [a for a in range(len(s.shape)) if a not in red_spanned]
    moved = jnp.moveaxis(m, [left.index(a) for a in red_fixed],
                         range(m.ndim - len(red_fixed), m.ndim))
    moved = jnp.reshape(moved, (*moved.shape[:m.ndim - len(red_fixed)], -1))
    pick = jnp.argmax if big else jnp.argmin
    top = pick(moved, axis=-1).astype(jnp.int32)
    worst = _worst(moved.dtype, big)
    first = jnp.take_along_axis(moved, top[..., None], axis=-1)[..., 0]
    coords = jnp.arange(moved.shape[-1], dtype=jnp.int32).reshape((1,) * top.ndim + (-1,))
    others = jnp.where(coords == top[..., None], worst, moved)
    second = jnp.max(others, axis=-1) if big else jnp.min(others, axis=-1)
    fixed = tuple(keep.index(a) for a in s.fixed if a not in axes)
    idx = s.idx[:, [s.fixed.index(keep[f]) for f in fixed]] if fixed else None
    first, second, top = (hyper(x, fixed, idx) for x in (first, second, top))
    j = jnp.zeros(s.idx.shape[0], jnp.int32)
    for a in red_fixed:  # the perturbed coordinate, row-major over the reduced fixed axes
        j = j * s.shape[a] + s.column(a)
    j = j.reshape((-1,) + (1,) * (first.ndim - 1))
    rest = jnp.where(top == j, second, first)
    spanned_axes = tuple(1 + s.spanned.index(a) for a in red_spanned)
    v = eqn.prim.bind(s.val, axes=spanned_axes, **_extra(eqn.params)) if spanned_axes else s.val
    val = jnp.maximum(rest, v) if big else jnp.minimum(rest, v)
    _count(structured=_size(s.val.shape[1:]))
    return [Slab(bases[0], fixed, idx, val)]


def _extra(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "axes"}


def _worst(dtype, big: bool):
    """The value a max (min) never picks: -inf (+inf), or an integer type's extreme."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(-jnp.inf if big else jnp.inf, dtype)
    info = jnp.iinfo(dtype)
    return jnp.asarray(info.min if big else info.max, dtype)


def slice_(eqn: Eqn, ins, bases):
    s = unfix_unit_axes(ins[0])
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)
    c = s.val.shape[0]
    val = s.val
    for a in s.spanned:
        ax = 1 + s.spanned.index(a)
        val = lax.slice_in_dim(val, start[a], limit[a], strides[a], axis=ax)
    if not s.fixed:
        return [Slab(bases[0], (), None, val)]
    if all((start[a], limit[a], strides[a]) == (0, s.shape[a], 1) for a in s.fixed):
        return [Slab(bases[0], s.fixed, s.idx, val)]  # the same hyperplanes
    cols, inside = [], jnp.ones(c, bool)
    for a in s.fixed:
        k = s.column(a) - start[a]
        inside &= (k >= 0) & (k < limit[a] - start[a]) & (k % strides[a] == 0)
        cols.append(jnp.clip(k // strides[a], 0, eqn.shapes[0][a] - 1))
    idx = jnp.stack(cols, axis=1).astype(jnp.int32)
    # A perturbation outside the slice leaves it unperturbed: its base, at any coordinate.
    unchanged = hyper(bases[0], s.fixed, idx)
    mask = inside.reshape((c,) + (1,) * (val.ndim - 1))
    return [Slab(bases[0], s.fixed, idx, jnp.where(mask, val, unchanged))]


def concatenate(eqn: Eqn, ins, bases):
    dim = eqn.params["dimension"]
    slabs = [x for x in ins if isinstance(x, Slab)]
    s = slabs[0]
    if len(slabs) > 1:  # several perturbed parts: on the same hyperplanes, along a spanned axis
        if dim in s.fixed or not all(_same_plane(x, s) for x in slabs):
            return None
    else:
        s = unfix_unit_axes(s)
    where = next(k for k, x in enumerate(ins) if isinstance(x, Slab))
    offset = sum(jnp.shape(x)[dim] for x in ins[:where])
    if dim in s.fixed:
        col = s.fixed.index(dim)
        idx = s.idx.at[:, col].add(offset)
        return [Slab(bases[0], s.fixed, idx, s.val)]
    parts = [x.val if isinstance(x, Slab) else
             jnp.broadcast_to(hyper(x, s.fixed, s.idx),
                              (s.val.shape[0], *hyper_shape(x.shape, s.fixed)))
             for x in ins]
    val = jnp.concatenate(parts, axis=1 + s.spanned.index(dim))
    _count(structured=_size(val.shape[1:]))
    return [Slab(bases[0], s.fixed, s.idx, val)]


def hyper_shape(shape, fixed) -> tuple[int, ...]:
    return tuple(n for a, n in enumerate(shape) if a not in fixed)


def dot_general(eqn: Eqn, ins, bases):
    """A contraction with one perturbed operand A and an unperturbed one B: the output's base
    plus the contraction of A's change on its hyperplane with the matching slice of B."""
    if all(isinstance(x, Slab) for x in ins[:2]):
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    pos = 0 if isinstance(ins[0], Slab) else 1
    a, b = ins[pos], ins[1 - pos]
    a = unfix_unit_axes(a)
    ac, bc = (lc, rc) if pos == 0 else (rc, lc)
    ab, bb = (lb, rb) if pos == 0 else (rb, lb)
    a_free = [x for x in range(len(a.shape)) if x not in ac and x not in ab]
    b_free = [x for x in range(len(b.shape)) if x not in bc and x not in bb]
    pair = dict(zip(list(ac) + list(ab), list(bc) + list(bb)))  # A axis -> B axis
    # B indexed at A's fixed contracting and batch coordinates, per perturbation.
    b_fixed = [pair[x] for x in a.fixed if x in pair]
    b_sub = hyper(b, tuple(b_fixed), a.idx[:, [a.fixed.index(x) for x in a.fixed if x in pair]]) \
        if b_fixed else b
    b_rest = [x for x in range(len(b.shape)) if x not in b_fixed]
    letters = iter(string.ascii_letters)
    c_letter = next(letters)
    a_letter = {x: next(letters) for x in a.spanned}
    b_letter = {}
    for x in b_rest:
        partner = next((y for y, z in pair.items() if z == x), None)
        b_letter[x] = a_letter[partner] if partner is not None else next(letters)
    # Output axes: batch (A's order), then lhs free, then rhs free.
    batch_axes = list(ab)
    lhs_free_a = a_free if pos == 0 else b_free
    rhs_free_a = b_free if pos == 0 else a_free
    out_axes = ([("a", x) for x in batch_axes]
                + [("a" if pos == 0 else "b", x) for x in lhs_free_a]
                + [("b" if pos == 0 else "a", x) for x in rhs_free_a])
    out_fixed, cols, spec_out = [], [], c_letter
    for j, (side, x) in enumerate(out_axes):
        if side == "a" and x in a.fixed:
            out_fixed.append(j)
            cols.append(a.fixed.index(x))
        else:
            spec_out += a_letter[x] if side == "a" else b_letter[x]
    # No fixed axis contracted: the output on its hyperplane is the contraction of A's values
    # there, computed as the dense pass would. Otherwise base + the contraction of the change.
    direct = not any(x in ac for x in a.fixed)
    operand = a.val if direct else delta(a)
    spec_a = c_letter + "".join(a_letter[x] for x in a.spanned)
    spec_b = (c_letter if b_fixed else "") + "".join(b_letter[x] for x in b_rest)
    dtype = eqn.dtypes[0]
    # The barrier keeps XLA from fusing the elementwise producer of the operand (a tanh) into
    # the contraction, which on CPU turns the library matrix multiply into a naive loop (2-3x
    # slower, measured on the 4.2M MLP's second layer).
    contribution = jnp.einsum(f"{spec_a},{spec_b}->{spec_out}", lax.optimization_barrier(operand),
                              b_sub, precision=eqn.params.get("precision"),
                              preferred_element_type=dtype).astype(dtype)
    out_fixed = tuple(out_fixed)
    idx = a.idx[:, cols] if out_fixed else None
    val = contribution if direct else hyper(bases[0], out_fixed, idx) + contribution
    contracted = _size([a.shape[x] for x in a.spanned if x in ac])
    _count(structured=_size(val.shape[1:]) * max(1, contracted))
    return [Slab(bases[0], out_fixed, idx, val)]


def viewed_dot_general(eqn: Eqn, ins, bases):
    """A contraction of a Viewed slab whose merged axes are all contracted: the other operand's
    partner axis is split into the merged sizes, and the slab contracted over them directly."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    pos = 0 if isinstance(ins[0], Viewed) else 1
    v, b = ins[pos], ins[1 - pos]
    if isinstance(b, (Slab, Viewed)):
        return None
    ac, bc = (lc, rc) if pos == 0 else (rc, lc)
    ab, bb = (lb, rb) if pos == 0 else (rb, lb)
    pair = dict(zip(ac, bc))
    inner_axis, split = {}, {}  # new axis -> inner axis; B axis -> (inner axes, sizes)
    for ga, gb in v.groups:
        if len(ga) == 1 and len(gb) == 1:
            inner_axis[gb[0]] = ga[0]
        elif len(gb) == 1 and gb[0] in pair:
            split[pair[gb[0]]] = (list(ga), [v.inner.shape[a] for a in ga])
        else:
            return None
    b_shape, b_axis = [], {}
    for x in range(b.ndim):
        b_axis[x] = len(b_shape)
        b_shape += split[x][1] if x in split else [b.shape[x]]
    a_c, b_c = [], []
    for j, x in zip(ac, bc):
        if x in split:
            a_c += split[x][0]
            b_c += [b_axis[x] + t for t in range(len(split[x][0]))]
        else:
            a_c.append(inner_axis[j])
            b_c.append(b_axis[x])
    a_b, b_b = [inner_axis[j] for j in ab], [b_axis[x] for x in bb]
    dims = ((a_c, b_c), (a_b, b_b)) if pos == 0 else ((b_c, a_c), (b_b, a_b))
    dims = tuple(tuple(tuple(d) for d in side) for side in dims)
    inner_eqn = dataclasses.replace(eqn, params=dict(eqn.params, dimension_numbers=dims))
    b2 = jnp.reshape(b, b_shape)
    return dot_general(inner_eqn, [v.inner, b2] if pos == 0 else [b2, v.inner], bases)


def conv(eqn: Eqn, ins, bases):
    """conv_general_dilated with one perturbed operand (it is linear in each): a perturbed
    kernel whose output feature is fixed changes one output channel, by the convolution of its
    input channel(s) with the kernel's change; a perturbed input whose feature axis is fixed
    changes the output channels of its group, by the convolution of its change with that input
    channel's kernel slice.

    A transposed convolution (lhs_dilation > 1) is left to the dense fallback: as one
    convolution per perturbation, XLA's CPU backend runs it far below its dense throughput
    (the decoder of tests/test_structured.py: 1.7 ms per perturbation of its kernel against
    1.8 ms for a whole batched dense evaluation), which the counted work cannot show."""
    p = eqn.params
    if (all(isinstance(x, Slab) for x in ins[:2]) or p["batch_group_count"] != 1
            or any(d != 1 for d in p["lhs_dilation"])):
        return None
    dn = p["dimension_numbers"]
    if isinstance(ins[1], Slab):  # the output feature must be fixed, the input one may be
        return _conv_kernel(eqn, ins[0], fix_unit_axes(unfix_unit_axes(ins[1]), dn.rhs_spec[:2]),
                            bases)
    return _conv_input(eqn, fix_unit_axes(unfix_unit_axes(ins[0]), dn.lhs_spec[:2]), ins[1],
                       bases)


def _conv_one_group(p) -> Callable:
    """The primitive's convolution with one feature group (the caller selects the group)."""
    def run(lhs, rhs):
        return lax.conv_general_dilated(
            lhs, rhs, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
            p["dimension_numbers"], 1, 1, p["precision"], p["preferred_element_type"])
    return run


def _change(s: Slab, unit_axes: tuple[int, ...]):
    """The change on the hyperplane as a dense (C, *shape) array, with `unit_axes` (fixed
    axes) cut down to size 1: only the hyperplane's own coordinate along them is kept."""
    shape = tuple(1 if a in unit_axes else n for a, n in enumerate(s.shape))
    idx = s.idx.at[:, [s.fixed.index(a) for a in unit_axes]].set(0)
    change = delta(s)
    return dense(Slab(jnp.zeros(shape, change.dtype), s.fixed, idx, change))


def _conv_kernel(eqn: Eqn, x, k: Slab, bases):
    dn = eqn.params["dimension_numbers"]
    groups = eqn.params["feature_group_count"]
    o_axis, i_axis = dn.rhs_spec[0], dn.rhs_spec[1]
    if o_axis not in k.fixed:
        return None
    one_input = i_axis in k.fixed
    n_out, i_g = k.shape[o_axis], k.shape[i_axis]
    o = k.column(o_axis)
    kern = _change(k, (o_axis, i_axis) if one_input else (o_axis,))
    first = (o // (n_out // groups)) * i_g  # the group's first input channel
    chans = (first + k.column(i_axis))[:, None] if one_input else \
        first[:, None] + jnp.arange(i_g, dtype=first.dtype)[None, :]
    f = dn.lhs_spec[1]
    lhs = jnp.moveaxis(jnp.take(x, chans, axis=f), f, 0)  # (C, *x with those channels)
    out = jax.vmap(_conv_one_group(eqn.params))(lhs, kern)  # one output feature
    of = dn.out_spec[1]
    val = hyper(bases[0], (of,), o[:, None]) + jnp.squeeze(out, 1 + of).astype(eqn.dtypes[0])
    window = _size([k.shape[a] for a in dn.rhs_spec[2:]])
    _count(structured=_size(eqn.shapes[0]) // n_out * window * (1 if one_input else i_g))
    return [Slab(bases[0], (of,), o[:, None].astype(jnp.int32), val)]


def _conv_input(eqn: Eqn, x: Slab, kernel, bases):
    dn = eqn.params["dimension_numbers"]
    b_axis, f_axis = dn.lhs_spec[0], dn.lhs_spec[1]
    if f_axis not in x.fixed or any(a not in (b_axis, f_axis) for a in x.fixed):
        return None
    groups = eqn.params["feature_group_count"]
    o_axis, i_axis = dn.rhs_spec[0], dn.rhs_spec[1]
    n_out, i_g = kernel.shape[o_axis], kernel.shape[i_axis]
    per_group = n_out // groups
    one_image = b_axis in x.fixed
    ch = x.column(f_axis)
    change = _change(x, (b_axis, f_axis) if one_image else (f_axis,))
    kern = jnp.expand_dims(jnp.moveaxis(jnp.take(kernel, ch % i_g, axis=i_axis), i_axis, 0),
                           1 + i_axis)  # (C, *kernel with one input channel)
    starts = (ch // i_g) * per_group  # the group's output channels
    kern = jax.vmap(lambda kk, s: lax.dynamic_slice_in_dim(kk, s, per_group, axis=o_axis))(
        kern, starts)
    out = jax.vmap(_conv_one_group(eqn.params))(change, kern)
    ob, of = dn.out_spec[0], dn.out_spec[1]
    if groups > 1:  # into the group's place among all output channels
        shape = list(out.shape)
        shape[1 + of] = n_out
        out = jax.vmap(lambda z, y, s: lax.dynamic_update_slice_in_dim(z, y, s, axis=of))(
            jnp.zeros(shape, out.dtype), out, starts)
    fixed = (ob,) if one_image else ()
    idx = x.column(b_axis)[:, None].astype(jnp.int32) if one_image else None
    if one_image:
        out = jnp.squeeze(out, 1 + ob)
    val = hyper(bases[0], fixed, idx) + out.astype(eqn.dtypes[0])
    window = _size([kernel.shape[a] for a in dn.rhs_spec[2:]])
    _count(structured=_size(val.shape[1:]) * window)
    return [Slab(bases[0], fixed, idx, val)]


def reduce_window(eqn: Eqn, ins, bases):
    """Pooling over spanned axes; fixed axes must have a window of 1 (a channel)."""
    s = unfix_unit_axes(ins[0])
    p = eqn.params
    for a in s.fixed:
        if (p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1
                or tuple(p["padding"][a]) != (0, 0) or p["base_dilation"][a] != 1):
            return None
    keep = (0, *[1 + a for a in s.spanned])

    def pick(values, unit):
        full = (unit, *values)
        return tuple(full[k] for k in keep)

    params = dict(p, window_dimensions=pick(p["window_dimensions"], 1),
                  window_strides=pick(p["window_strides"], 1),
                  padding=pick(p["padding"], (0, 0)),
                  base_dilation=pick(p["base_dilation"], 1),
                  window_dilation=pick(p["window_dilation"], 1))
    val = eqn.prim.bind(s.val, **params)
    _count(structured=_size(s.val.shape[1:]))
    return [Slab(bases[0], s.fixed, s.idx, val)]


RULES: dict[str, Callable] = {
    "transpose": transpose, "broadcast_in_dim": broadcast_in_dim, "reshape": reshape,
    "squeeze": squeeze, "reduce_sum": reduce, "reduce_max": reduce, "reduce_min": reduce,
    "reduce_prod": reduce, "slice": slice_, "concatenate": concatenate,
    "dot_general": dot_general, "conv_general_dilated": conv,
    "reduce_window_sum": reduce_window, "reduce_window_max": reduce_window,
    "reduce_window_min": reduce_window,
}


def apply(eqn: Eqn, ins, bases) -> list[Slab]:
    name = eqn.prim.name
    if name == "dot_general" and any(isinstance(x, Viewed) for x in ins[:2]):
        out = viewed_dot_general(eqn, ins, bases)
        if out is not None:
            return out
    ins = [as_slab(x) for x in ins]
    out = None
    if name in ELEMENTWISE:
        out = elementwise(eqn, ins, bases)
    elif name in RULES:
        out = RULES[name](eqn, ins, bases)
    return out if out is not None else _dense(eqn, ins, bases)
