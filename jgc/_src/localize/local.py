"""The local check of one equation: its autodiff derivative against finite differences of its
own output, at the inputs it received.

For an equation y = F(x) (a primitive, or a custom rule's call) recorded at x, a probe is a
direction u over its active floating-point inputs (integer and inactive inputs are held fixed)
and a cotangent c over its live floating-point outputs: the scalar g(t) = <c, F(x + t u)> is
differenced by jgc's one stencil schedule and error model (estimate.derivative: the same steps,
refinement, kink, tie and rounding handling as check_grad), and compared with autodiff's
<jax.vjp(F)(c), u>. jax.vjp uses what jax.grad uses: the primitive's JVP and transpose, the
custom_jvp's jvp rule, the custom_vjp's bwd rule.

Probes: RANDOM directions over all active inputs together, and, with several active inputs,
one direction per input alone, so that a disagreement names the input. Each equation's probes
are evaluated together in one program (jit + vmap over probes), compiled once per equation
signature (primitive, parameters, shapes): the layers of a network, the iterations of a loop
share it.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.evaluators import programs
from jgc._src.evaluators.calls import first_line
from jgc._src.evaluators.structured import flatjaxpr
from jgc._src.localize.equations import Unit, bind, inexact
from jgc._src.report.vocab import Entry
from jgc._src.stages import differences as dq
from jgc._src.stages import errormodel as em
from jgc._src.stages import estimate as es
from jgc._src.stages import patterns
from jgc._src.stages.perturbations import exact_displacements

RANDOM = 2  # random directions over all active inputs, per equation


class Verdict:
    """A unit's outcome (plain strings: they serialise as they are)."""

    OK = "ok"
    KINK = "kink"  # verified: autodiff lies between the one-sided slopes
    WRONG = "wrong"
    UNRESOLVED = "unresolved"  # finite differences could not judge it (domain edge, rough)
    SKIPPED = "skipped"  # not differentiable here, or could not be evaluated


@dataclasses.dataclass(frozen=True)
class Local:
    """The local check of one unit.

    Attributes:
      verdict: a `Verdict`.
      inputs: per probe, the input position it moves (None: all active inputs together).
      autodiff, numerical: per probe, autodiff's and finite differences' derivative.
      status: per probe, estimate's entry status (OK, KINK, MISMATCH, ...).
      max_rel_error: the largest relative error over the probes.
      pattern, factor: the pattern of autodiff against finite differences (patterns.py).
      why: for skipped or unresolved units, why.
    """

    verdict: str
    inputs: tuple = ()
    autodiff: np.ndarray | None = None
    numerical: np.ndarray | None = None
    status: np.ndarray | None = None
    max_rel_error: float = 0.0
    pattern: str | None = None
    factor: float | None = None
    why: str | None = None
    varying: tuple = ()

    @property
    def wrong_inputs(self) -> tuple[int, ...]:
        """The input positions whose own probe disagrees (all inputs together when only the
        joint probes were made)."""
        if self.status is None:
            return ()
        bad = self.status == Entry.MISMATCH
        single = tuple(i for i, b in zip(self.inputs, bad) if b and i is not None)
        if single:
            return single
        return self.varying if bad.any() else ()


class _Signature:
    """A static jit argument: the equation to apply, equal for equations with the same
    primitive, parameters and input types (they compute the same function)."""

    def __init__(self, eqn, inputs, varying, live):
        self.eqn, self.varying, self.live = eqn, varying, live
        try:
            params = tuple(sorted((k, v) for k, v in eqn.params.items()))
            hash(params)
        except TypeError:
            params = id(eqn)
        avals = tuple((jnp.shape(x), str(jnp.result_type(x))) for x in inputs)
        self.key = (eqn.primitive, params, avals, varying, live)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Signature) and self.key == other.key

    def apply(self, inputs, xs):
        vals = list(inputs)
        for i, x in zip(self.varying, xs):
            vals[i] = x
        outs = bind(self.eqn, vals)
        return [outs[k] for k in self.live]


def _dot(c, outs):
    """sum <c, out>, in the widest float; a zero cotangent leaves its entry out (an output
    that is Inf or NaN at the recorded point gets one)."""
    wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return sum(jnp.sum(jnp.where(ci == 0, jnp.zeros((), o.dtype), ci * o)).astype(wide)
               for ci, o in zip(c, outs))


# The stencils every probe gets (h and 2h: estimate.derivative's first two), computed in the
# program that takes autodiff's derivative; finer ones (refinement) are a second program.
FIRST = (0, 1)


def _cost(sig: _Signature, evaluations: int) -> float:
    """The work of `evaluations` evaluations of an equation (flatjaxpr._cost's units)."""
    e = sig.eqn
    return evaluations * flatjaxpr._cost(e.primitive.name, e.params,
                                          [tuple(v.aval.shape) for v in e.invars],
                                          [tuple(v.aval.shape) for v in e.outvars])


def _at(sig: _Signature, inputs, c, rows):
    return _at_many((sig,), [inputs], [c], [rows])[0]


def _at_many(sigs: tuple, inputs, c, rows):
    """`_at` of several equations in one program: one compilation instead of one each (a
    small program's fixed cost, tracing and compiling, is most of its time). Compiled through
    jgc's program cache, keyed on the program's own trace (a second check of the same loss
    compiles nothing), with XLA's light options where its work is small."""
    def run(inputs, c, rows):
        return [_at_traced(*a) for a in zip(sigs, inputs, c, rows)]

    args = (inputs, c, rows)
    work = sum(_cost(s, len(r[0]) * 2 * len(FIRST) + 3) for s, r in zip(sigs, rows))
    return programs.compiled("localize", lambda: run, None, (), args, work=work,
                             by_program=True)(*args)


def _at_traced(sig: _Signature, inputs, c, rows):
    """<c, F(x)>, the sum of |c F(x)| (the size of its terms), jax.vjp's cotangents, and the
    first stencils (`_along` at FIRST)."""
    outs, pullback = jax.vjp(lambda *xs: sig.apply(inputs, xs),
                             *[inputs[i] for i in sig.varying])
    c = [ci.astype(o.dtype) for ci, o in zip(c, outs)]
    mults = jnp.asarray([m * dq.SCALES[s] for s in FIRST for m in (1.0, -1.0)])
    return (_dot(c, outs), _dot([jnp.abs(ci) for ci in c], [jnp.abs(o) for o in outs]),
            pullback(c), _along_traced(sig, inputs, c, rows, mults))


def _along(sig: _Signature, inputs, c, rows, mults):
    args = (inputs, c, rows, mults)
    return programs.compiled("localize_along", lambda: partial(_along_traced, sig), None, (),
                             args, work=_cost(sig, len(rows[0]) * len(mults)),
                             by_program=True)(*args)


def _along_traced(sig: _Signature, inputs, c, rows, mults):
    """<c, F(x + m row)> for each probe's rows and each multiplier m: (probes, multipliers)."""
    def one(row, m):
        xs = [inputs[i] + m.astype(r.dtype) * r for i, r in zip(sig.varying, row)]
        outs = sig.apply(inputs, xs)
        return _dot([ci.astype(o.dtype) for ci, o in zip(c, outs)], outs)

    return jax.vmap(lambda row: jax.vmap(lambda m: one(row, m))(mults))(rows)


# A custom_vjp's bwd receives the cotangent as data and may treat it nonlinearly (jax's
# documentation's clip_gradient clips it): its rule is also checked with the cotangent scaled
# by these factors. A VJP is linear in the cotangent, so a right rule passes at every scale.
COTANGENT_SCALES = (2.0 ** 10, 2.0 ** -10)


def check_unit(unit: Unit, varying: tuple[int, ...], live: tuple[int, ...], seed: int
               ) -> Local:
    """The local check of `unit`, moving its inputs `varying` and reading its outputs `live`."""
    return check_units([(unit, varying, live, seed)])[0]


def check_units(items: list[tuple]) -> list[Local]:
    """The local checks of several (unit, varying, live, seed), autodiff and the first
    stencils of all of them in one program; each alone where that program fails (a rule that
    raises is then named by its own check)."""
    preps = [_prepare(*item) for item in items]
    try:
        results = _at_many(tuple(p.sig for p in preps), [p.inputs for p in preps],
                           [p.c for p in preps], [p.stacked for p in preps])
    except Exception:  # noqa: BLE001 - one equation's failure: each checked alone
        return [_rechecked(item, _check(*item)) for item in items]
    return [_rechecked(item, _finish(p, r)) for item, p, r in zip(items, preps, results)]


def _rechecked(item: tuple, local: Local) -> Local:
    unit, varying, live, seed = item
    if unit.name.startswith("custom_vjp") and local.verdict in (Verdict.OK, Verdict.KINK):
        for scale in COTANGENT_SCALES:
            scaled = _check(unit, varying, live, seed, scale=scale)
            if scaled.verdict == Verdict.WRONG:
                return dataclasses.replace(
                    scaled, why=f"with the cotangent scaled by {scale:g}: the rule is not "
                                "linear in its cotangent")
    return local


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """One local check's inputs, cotangent and probes (see `_prepare`)."""

    unit: Unit
    varying: tuple
    live: tuple
    seed: int
    scale: float
    frozen: list | None
    sig: _Signature
    inputs: list
    c: list
    stacked: list
    effective: list
    which: tuple


def _prepare(unit: Unit, varying: tuple[int, ...], live: tuple[int, ...], seed: int,
             scale: float = 1.0, frozen: list | None = None) -> _Prepared:
    """A local check's inputs: `scale` multiplies the cotangent; `frozen` (per varying input,
    a bool mask or None) holds input entries fixed."""
    inputs = [jnp.asarray(x) for x in unit.inputs]
    rng = np.random.default_rng(seed)
    c = [jnp.asarray(np.where(np.isfinite(unit.outputs[k]),
                              scale * rng.standard_normal(np.shape(unit.outputs[k])), 0.0))
         for k in live]
    rows, effective, which = probes(varying, [np.asarray(inputs[i]) for i in varying], rng,
                                    frozen)
    stacked = [jnp.asarray(np.stack([r[k] for r in rows])) for k in range(len(varying))]
    return _Prepared(unit, varying, live, seed, scale, frozen,
                     _Signature(unit.eqn, inputs, varying, live), inputs, c, stacked, effective,
                     which)


def _check(unit: Unit, varying: tuple[int, ...], live: tuple[int, ...], seed: int,
           scale: float = 1.0, frozen: list | None = None) -> Local:
    """One local check, in its own program."""
    p = _prepare(unit, varying, live, seed, scale, frozen)
    try:
        result = _at(p.sig, p.inputs, p.c, p.stacked)
    except Exception as e:  # noqa: BLE001 - a rule that cannot run here
        return Local(Verdict.UNRESOLVED, why=f"autodiff raised {first_line(e)}", varying=varying)
    return _finish(p, result)


def _finish(p: _Prepared, result) -> Local:
    """The local check's verdict from `_at`'s result: the error model, refined where needed."""
    f0, size, bars, first = result
    bars = [np.asarray(b, np.float64) for b in bars]
    overflow = not all(np.isfinite(p.unit.outputs[k]).all() for k in p.live)
    if p.frozen is None and overflow and not all(np.isfinite(b).all() for b in bars):
        # An output that is Inf or NaN at this point (exp overflowing) has no derivative to
        # judge; its zero cotangent times its infinite partials is NaN in the inputs' bars.
        # Those input entries are held fixed, and the rest checked.
        return _check(p.unit, p.varying, p.live, p.seed, p.scale,
                      [~np.isfinite(b) for b in bars])
    which = p.which
    dtype = np.result_type(*[np.asarray(p.inputs[i]).dtype for i in p.varying])
    eps = float(jnp.finfo(dtype).eps)
    h = _step(dtype)
    n = len(which)
    with np.errstate(invalid="ignore"):  # a held entry's NaN bar times its zero step
        products = [[np.where(e == 0, 0.0, b * e) for b, e in zip(bars, eff)]
                    for eff in p.effective]
    ad = np.array([sum(float(np.sum(q)) for q in row) for row in products])
    terms = np.array([sum(float(np.sum(np.abs(q))) for q in row) for row in products])
    first = np.asarray(first, np.float64)
    cache = {s: first[:, 2 * k:2 * k + 2] for k, s in enumerate(FIRST)}

    def evaluate(s, where):
        if s not in cache:  # every other stencil at once: one more program, called once
            rest = [k for k in range(len(dq.SCALES)) if k not in FIRST]
            m = jnp.asarray([sign * dq.SCALES[k] for k in rest for sign in (1.0, -1.0)])
            v = np.asarray(_along(p.sig, p.inputs, p.c, p.stacked, m), np.float64)
            cache.update({k: v[:, 2 * j:2 * j + 2] for j, k in enumerate(rest)})
        v = cache[s]
        width = np.full(n, dq.SCALES[s] * h)
        return es.Sides(v[where, 0], v[where, 1], width[where], width[where],
                        f0=np.full(n, float(f0))[where])

    try:
        d = dq.differences(float(f0), n, None, eps, dtype == np.float64, f_scale=float(size))
        found = es.derivative(evaluate, d, ad, em.rounding(ad, eps, terms),
                              checked_is_autodiff=True)
    except Exception as e:  # noqa: BLE001 - the equation cannot be evaluated off its point
        return Local(Verdict.UNRESOLVED, why=f"finite differences raised {first_line(e)}",
                     varying=p.varying)
    return dataclasses.replace(_judge(found, ad, which, cache[0]), varying=p.varying)


def probes(varying, xs, rng, frozen=None) -> tuple[list, list, tuple]:
    """Per probe: the step rows (h times the direction, in each input's dtype), the effective
    directions (the exact displacements over 2h), and which input it moves (None: all).
    Non-finite input entries, and those `frozen` marks, stay fixed."""
    h = _step(np.result_type(*[x.dtype for x in xs]))
    which = [None] * RANDOM + (list(varying) if len(varying) > 1 else [])
    rows, effective = [], []
    frozen = frozen or [None] * len(xs)
    for target in which:
        row, eff = [], []
        for i, x, fixed in zip(varying, xs, frozen):
            z = rng.standard_normal(x.shape) if target in (None, i) else np.zeros(x.shape)
            finite = np.isfinite(x) if fixed is None else np.isfinite(x) & ~fixed
            z = np.where(finite, z, 0.0) * np.maximum(1.0, np.abs(np.where(finite, x, 0.0)))
            z = z / max(float(np.max(np.abs(z), initial=0)), 1e-300)
            r = (h * z).astype(x.dtype)
            plus, minus = exact_displacements(x, [r])
            row.append(r)
            eff.append((plus[0] + minus[0]) / (2 * h))
        rows.append(row)
        effective.append(eff)
    return rows, effective, tuple(which)


def _step(dtype) -> float:
    """The probes' step: u**(1/3) rounded down to a power of two (exact multiples)."""
    return 2.0 ** math.floor(math.log2(float(jnp.finfo(dtype).eps) ** (1 / 3)))


def _judge(found: es.Derivative, ad: np.ndarray, which: tuple, sides: np.ndarray) -> Local:
    model, status = found.model, found.cmp.status
    finite = np.isfinite(sides).all(axis=1) & np.isfinite(model.value)
    rel = np.where(finite, found.cmp.rel_error, 0.0)
    common = dict(inputs=which, autodiff=ad, numerical=model.value, status=status,
                  max_rel_error=float(np.max(rel, initial=0.0)))
    if not finite.all():
        return Local(Verdict.UNRESOLVED, **common,
                     why="finite differences leave the equation's domain here")
    if np.any(status == Entry.MISMATCH):
        tol = em.tolerance(model.error, model.value)
        pattern, factor = patterns.find_pattern(ad, model.value, np.zeros(len(ad)), tol,
                                                (len(ad),), False, smooth=~model.kink)
        return Local(Verdict.WRONG, **common, pattern=pattern, factor=factor)
    if np.any(status == Entry.ROUGH):
        return Local(Verdict.UNRESOLVED, **common,
                     why="the equation is not smooth at the step's scale")
    if np.any((status == Entry.KINK) | (status == Entry.TIE)):
        return Local(Verdict.KINK, **common)
    return Local(Verdict.OK, **common)


def probed(unit: Unit, active: set, live: set) -> tuple[tuple, tuple]:
    """(varying, live) of a unit: its real floating-point inputs that depend on the
    parameters, and its real floating-point outputs that reach the loss. An equation with a
    complex active input or live output is not checked locally (its probes are real): both
    come back empty."""
    if any(jnp.issubdtype(jnp.result_type(x), jnp.complexfloating)
           for x, i in zip((*unit.inputs, *unit.outputs), (*unit.in_ids, *unit.out_ids))
           if i in active or i in live):
        return (), ()
    varying = tuple(k for k, (x, i) in enumerate(zip(unit.inputs, unit.in_ids))
                    if i in active and inexact(x))
    outs = tuple(k for k, (x, i) in enumerate(zip(unit.outputs, unit.out_ids))
                 if i in live and inexact(x))
    return varying, outs
