"""Recording a program equation by equation, with the values each equation received.

The loss's closed jaxpr is evaluated by a small interpreter (like jax.core.eval_jaxpr) that
appends to a tape, in program order, one `Unit` per equation whose derivative jax.grad uses:
every primitive, and every custom_jvp/custom_vjp call as one unit (its rule is what autodiff
uses; the body's primitives are never differentiated, so they are not units). Calls (jit, pjit,
closed_call, remat) are entered and their equations recorded one by one; a scan or while loop is
unrolled, each iteration's equations tagged with the iteration; a cond records the branch taken.
Where values move between levels without an equation (a scan's slices and stacked outputs) the
tape holds a `Link`, so that which values depend on the parameters (`active`) and which reach
the output (`live`) can be followed through the whole program.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from jax.extend.core import Literal
except ImportError:  # pragma: no cover - older jax
    from jax.core import Literal  # type: ignore[no-redef]

CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
         "custom_lin")
CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
# Equations whose derivative is zero by design (not a rule to check; nothing passes through).
BLOCKING = ("stop_gradient",)
MAX_ITERATIONS = 256  # loop iterations unrolled in all; beyond, a loop is one unit


@dataclasses.dataclass(frozen=True, eq=False)
class Unit:
    """One equation as autodiff sees it, with the values it received.

    Attributes:
      eqn: the jaxpr equation (a primitive, or a custom rule's call).
      inputs, outputs: its concrete input and output values.
      in_ids, out_ids: value identities on the tape (None for a literal).
      scopes: where it sits, outermost first: a `Scope` per enclosing call, loop iteration and
        cond branch ("jit inner", "scan iteration 3", "cond branch 1", ...).
      iteration, branch: the innermost loop iteration and cond branch, if any.
    """

    eqn: Any
    inputs: tuple
    outputs: tuple
    in_ids: tuple
    out_ids: tuple
    scopes: tuple = ()
    iteration: int | None = None
    branch: int | None = None

    @property
    def name(self) -> str:
        return self.eqn.primitive.name

    @property
    def custom(self) -> bool:
        return self.name in CUSTOM

    @property
    def context(self) -> tuple[str, ...]:
        return tuple(s.label for s in self.scopes)

    @property
    def callers(self) -> tuple:
        """The enclosing equations (calls, loops, conds), innermost first."""
        return tuple(s.eqn for s in reversed(self.scopes))


@dataclasses.dataclass(frozen=True)
class Scope:
    label: str
    eqn: Any


@dataclasses.dataclass(frozen=True)
class Link:
    """Values made from others without an equation (a scan's slices, its stacked outputs), or
    a cond's outputs from its index (`eqn`: the cond)."""

    in_ids: tuple
    out_ids: tuple
    eqn: Any = None


@dataclasses.dataclass
class Tape:
    items: list = dataclasses.field(default_factory=list)
    arg_ids: tuple = ()
    out_ids: tuple = ()
    outputs: list = dataclasses.field(default_factory=list)
    unrolled: int = 0
    _ids: Any = dataclasses.field(default_factory=itertools.count)

    def new(self, n: int = 1) -> tuple:
        return tuple(next(self._ids) for _ in range(n))

    @property
    def units(self) -> list[Unit]:
        return [u for u in self.items if isinstance(u, Unit)]


def bind(eqn, invals: list) -> list:
    """The equation applied to `invals` (concrete or traced), as jax.core.eval_jaxpr does."""
    got = eqn.primitive.get_bind_params(eqn.params)
    # jax 0.7 returns (subfuns, params); jax 0.10 the params alone.
    subfuns, params = got if isinstance(got, tuple) else ((), got)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def record(closed, args: list) -> Tape:
    """The tape of `closed` (a ClosedJaxpr) evaluated at `args`.

    Without control flow the interpreter runs inside one compiled program that returns every
    equation's values (run equation by equation, each primitive compiles on its own: 0.76 s
    for a 10-equation MLP against about 0.1 s); a cond or a while loop needs the values as
    it goes (which branch, whether to go on), so such a program is recorded eagerly.
    """
    if not _branches(closed.jaxpr):
        try:
            return _record_compiled(closed, args)
        except Exception:  # noqa: BLE001 - recorded eagerly instead
            pass
    return _record(closed, args)


def _record(closed, args: list) -> Tape:
    tape = Tape()
    tape.arg_ids = tape.new(len(args))
    consts = list(closed.consts)
    tape.outputs, tape.out_ids = _run(tape, closed.jaxpr, consts, tape.new(len(consts)),
                                      list(args), tape.arg_ids, ())
    return tape


def _branches(jaxpr) -> bool:
    """Whether a jaxpr holds a cond or a while loop, at any depth."""
    for e in jaxpr.eqns:
        if e.primitive.name in ("cond", "while"):
            return True
        for value in e.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns") and _branches(inner):
                    return True
    return False


def _record_compiled(closed, args: list) -> Tape:
    """`_record` traced into one program; the tape's values are then its outputs."""
    held: list[Tape] = []

    def run(*args):
        tape = _record(closed, list(args))
        held.append(tape)
        return ([[*u.inputs, *u.outputs] for u in tape.units], tape.outputs)

    from jgc._src.evaluators import programs  # jgc's program cache, keyed on the trace
    from jgc._src.evaluators.structured.flatjaxpr import jaxpr_cost

    args = tuple(args)
    program = programs.compiled("localize_record", lambda: run, None, (), args,
                                work=jaxpr_cost(closed), by_program=True)
    values, outputs = program(*args)
    tape = held[-1]  # the structure as traced (by the key, or by the compilation)
    units = iter(zip(tape.units, values))
    for k, item in enumerate(tape.items):
        if isinstance(item, Unit):
            unit, vals = next(units)
            n = len(unit.inputs)
            tape.items[k] = dataclasses.replace(unit, inputs=tuple(vals[:n]),
                                                outputs=tuple(vals[n:]))
    tape.outputs = list(outputs)
    return tape


def _open(jaxpr) -> tuple[Any, list]:
    """(jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if hasattr(jaxpr, "consts") and hasattr(jaxpr, "jaxpr"):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def _run(tape: Tape, jaxpr, consts, const_ids, args, arg_ids, context, iteration=None,
         branch=None) -> tuple[list, tuple]:
    env: dict = {}
    for v, x, i in zip(jaxpr.constvars, consts, const_ids):
        env[v] = (x, i)
    for v, x, i in zip(jaxpr.invars, args, arg_ids):
        env[v] = (x, i)

    def read(v):
        if isinstance(v, Literal):
            return v.val, None
        return env[v]

    for eqn in jaxpr.eqns:
        pairs = [read(v) for v in eqn.invars]
        invals, ids = [p[0] for p in pairs], tuple(p[1] for p in pairs)
        name = eqn.primitive.name
        where = (tape, invals, ids, context, iteration, branch)
        if name in CALLS and "jaxpr" in eqn.params:
            outs, out_ids = _call(eqn, *where)
        elif name == "cond" and tape.unrolled < MAX_ITERATIONS:
            outs, out_ids = _cond(eqn, *where)
        elif name == "scan" and tape.unrolled + eqn.params["length"] <= MAX_ITERATIONS:
            outs, out_ids = _scan(eqn, *where)
        elif name == "while" and tape.unrolled < MAX_ITERATIONS:
            outs, out_ids = _while(eqn, *where)
        else:
            outs = bind(eqn, invals)
            out_ids = tape.new(len(outs))
            tape.items.append(Unit(eqn, tuple(invals), tuple(outs), ids, out_ids, context,
                                   iteration, branch))
        for v, x, i in zip(eqn.outvars, outs, out_ids):
            env[v] = (x, i)
    pairs = [read(v) for v in jaxpr.outvars]
    return [p[0] for p in pairs], tuple(tape.new()[0] if p[1] is None else p[1] for p in pairs)


def _call(eqn, tape, invals, ids, context, iteration, branch):
    inner, consts = _open(eqn.params["jaxpr"])
    label = eqn.params.get("name")
    label = f"{eqn.primitive.name} {label}" if label else eqn.primitive.name
    return _run(tape, inner, consts, tape.new(len(consts)), invals, ids,
                (*context, Scope(label, eqn)),
                iteration, branch)


def _cond(eqn, tape, invals, ids, context, iteration, branch):
    branches = eqn.params["branches"]
    index = int(np.clip(int(np.asarray(invals[0])), 0, len(branches) - 1))
    inner, consts = _open(branches[index])
    tape.unrolled += 1
    outs, out_ids = _run(tape, inner, consts, tape.new(len(consts)), invals[1:], ids[1:],
                         (*context, Scope(f"cond branch {index}", eqn)), iteration, index)
    if ids[0] is not None:
        tape.items.append(Link((ids[0],), out_ids, eqn))
    return outs, out_ids


def _scan(eqn, tape, invals, ids, context, iteration, branch):
    p = eqn.params
    n_c, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    inner, body_consts = _open(p["jaxpr"])
    const_vals, carry, xs = invals[:n_c], invals[n_c:n_c + n_carry], invals[n_c + n_carry:]
    const_ids, carry_ids, xs_ids = ids[:n_c], ids[n_c:n_c + n_carry], ids[n_c + n_carry:]
    tape.unrolled += length
    ys_steps: dict[int, tuple] = {}
    for i in range(length):
        t = length - 1 - i if p["reverse"] else i
        x_t = [x[t] for x in xs]
        x_ids = tape.new(len(xs))
        tape.items.append(Link(tuple(i for i in xs_ids if i is not None), x_ids))
        outs, out_ids = _run(tape, inner, body_consts, tape.new(len(body_consts)),
                             [*const_vals, *carry, *x_t], (*const_ids, *carry_ids, *x_ids),
                             (*context, Scope(f"scan iteration {t}", eqn)), t, branch)
        carry, carry_ids = outs[:n_carry], out_ids[:n_carry]
        ys_steps[t] = (outs[n_carry:], out_ids[n_carry:])
    n_ys = len(eqn.outvars) - n_carry
    ys, ys_ids = [], tape.new(n_ys)
    for k in range(n_ys):
        parts = [ys_steps[t][0][k] for t in range(length)]
        ys.append(jnp.stack(parts) if parts else jnp.zeros(eqn.outvars[n_carry + k].aval.shape,
                                                            eqn.outvars[n_carry + k].aval.dtype))
    tape.items.append(Link(tuple(i for t in ys_steps for i in ys_steps[t][1]), ys_ids))
    return [*carry, *ys], (*carry_ids, *ys_ids)


def _while(eqn, tape, invals, ids, context, iteration, branch):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond, cond_consts = _open(p["cond_jaxpr"])
    body, body_consts = _open(p["body_jaxpr"])
    cvals, bvals, carry = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
    b_ids, carry_ids = ids[nc:nc + nb], ids[nc + nb:]
    step = 0
    while bool(jax.core.eval_jaxpr(cond, cond_consts, *cvals, *carry)[0]):
        if tape.unrolled >= MAX_ITERATIONS:  # the rest evaluated as one unit
            rest = bind(eqn, [*cvals, *bvals, *carry])
            rest_ids = tape.new(len(rest))
            tape.items.append(Link(tuple(i for i in (*b_ids, *carry_ids) if i is not None),
                                   rest_ids))
            return rest, rest_ids
        tape.unrolled += 1
        carry, carry_ids = _run(tape, body, body_consts, tape.new(len(body_consts)),
                                [*bvals, *carry], (*b_ids, *carry_ids),
                                (*context, Scope(f"while iteration {step}", eqn)), step,
                                branch)
        step += 1
    return carry, carry_ids


def inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def flow(tape: Tape, active_args) -> tuple[set, set]:
    """(active, live): the value ids that depend on the active arguments through equations
    with a derivative, and those the outputs depend on."""
    active = {i for i, on in zip(tape.arg_ids, active_args) if on}
    for item in tape.items:
        if isinstance(item, Unit) and item.name in BLOCKING:
            continue
        if any(i in active for i in item.in_ids):
            outs = item.outputs if isinstance(item, Unit) else (None,) * len(item.out_ids)
            active.update(i for i, x in zip(item.out_ids, outs) if x is None or inexact(x))
    live = set(tape.out_ids)
    for item in reversed(tape.items):
        if any(i in live for i in item.out_ids):
            live.update(i for i in item.in_ids if i is not None)
    return active, live
