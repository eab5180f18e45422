"""Localisation over a whole program, and `check_rules`, the audit of every rule it uses.

`localize` records the program (equations.py), checks its equations one by one in program
order at the values they received (local.py), and names the first whose derivative disagrees
with finite differences of its own output: the equations before it agree, so it is where
autodiff first goes wrong. `check_rules` checks every equation and reports one row per rule and
call site. `attach` is the hook check_grad runs when it finds jax.grad wrong.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.localize import boundary
from jgc._src.localize import equations as eq
from jgc._src.localize import findings as fd
from jgc._src.localize.local import Local, Verdict, check_units, probed
from jgc._src.report.report import _jsonable
from jgc._src.stages.split import InputError

NOTHING = ("no single equation disagrees with finite differences at the values it received: "
           "every local derivative agrees (or could not be judged), so the disagreement is "
           "not one rule's")
FAILED = "localisation could not run: {why}"
NOT_FINITE = ("f(*args) is Inf or NaN at these inputs: each equation was checked on its finite "
              "values only, and an overflow on the way (exp of a large number) makes autodiff's "
              "chain rule give NaN (0 times Inf) without any rule being wrong. Check at inputs "
              "where f is finite.")


def _recorded(closed, args, active_args, live_outputs):
    """The tape of `closed` at `args`, and its (active, live) value ids."""
    tape = eq.record(closed, args)
    tape.out_ids = tuple(i for i, on in zip(tape.out_ids, live_outputs) if on)
    return (tape, *eq.flow(tape, active_args))


BATCH = 64  # equations checked in one program


def _batches(units, seed: int = 0):
    """(unit, varying, live, seed) lists of up to BATCH units, the custom rules apart from the
    primitives (they come first when checked first, and are the likely culprits)."""
    batch: list = []
    for k, unit, varying, outs in units:
        if batch and (len(batch) == BATCH or batch[-1][0].custom != unit.custom):
            yield batch
            batch = []
        batch.append((unit, varying, outs, seed + k))
    if batch:
        yield batch


def _checked_units(tape, active, live, custom_first=False):
    """(index, unit, varying inputs, live outputs) of every unit whose derivative matters:
    in program order, or with `custom_first` the custom rules first (the likely culprits:
    a check that stops at the first wrong unit then rarely checks a primitive)."""
    units = list(enumerate(tape.units))
    if custom_first:
        units.sort(key=lambda pair: not pair[1].custom)
    for n, unit in units:
        if unit.name in eq.BLOCKING:
            continue
        varying, outs = probed(unit, active, live)
        if varying and outs:
            yield n, unit, varying, outs


def localize(closed, args, active_args, live_outputs=None, seed: int = 0) -> fd.RuleFinding:
    """The first equation of `closed` evaluated at `args` whose derivative is wrong.

    `active_args` (bool per argument): what is differentiated; `live_outputs` (bool per output,
    default all): what the derivative is of. Never raises: a failure is said in the summary.
    """
    start = time.perf_counter()
    n, unjudged = 0, None
    live_outputs = live_outputs or [True] * len(closed.jaxpr.outvars)
    try:
        tape, active, live = _recorded(closed, args, active_args, live_outputs)
        for items in _batches(_checked_units(tape, active, live, custom_first=True), seed):
            for (unit, *_), local in zip(items, check_units(items)):
                n += 1
                if local.verdict == Verdict.WRONG:
                    return fd.finding(unit, local, n, time.perf_counter() - start)
                if local.verdict == Verdict.UNRESOLVED and unjudged is None:
                    unjudged = (unit, local)
        edge = boundary.find(tape, active, live, seed)
        if edge is not None:
            return fd.boundary_finding(*edge, n, time.perf_counter() - start)
        origin = boundary.nonfinite_origin(tape, active, live)
        if origin is not None:
            return fd.nonfinite_finding(origin, n, time.perf_counter() - start)
        if unjudged is not None:
            return fd.unjudged_finding(*unjudged, n, time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - localisation must never break the check
        return fd.RuleFinding(False, FAILED.format(why=f"{type(e).__name__}: {e}"[:200]),
                              n_checked=n, seconds=time.perf_counter() - start)
    return fd.RuleFinding(False, NOTHING, n_checked=n, seconds=time.perf_counter() - start)


# -- check_grad's hook -----------------------------------------------------------------------

def autodiff_wrong(report) -> bool:
    """Whether a check found jax.grad itself wrong: it was the checked gradient and a leaf
    mismatches, or, as a third opinion, it mismatches finite differences on some leaf."""
    if report.checked_source == report.autodiff_name:
        return bool(report.bad_leaves)
    return any(leaf.autodiff_status == "mismatch" for leaf in report.leaves)


def attach(report, check):
    """`report` with its `rule` set when jax.grad was found wrong (else unchanged)."""
    ev = check.ev
    if not autodiff_wrong(report) or not getattr(ev, "traceable", False):
        return report
    try:
        closed = ev.traced.closed
        parts = [jnp.asarray(ev.theta_np[a:b].astype(dt)) for a, b, dt in ev.segments]
        args = [*parts, *ev.dyn]
        live = [k == 0 for k in range(len(closed.jaxpr.outvars))]
        found = localize(closed, args, [k < len(parts) for k in range(len(args))], live,
                         seed=check.options.seed)
    except Exception as e:  # noqa: BLE001 - never break the check
        found = fd.RuleFinding(False, FAILED.format(why=f"{type(e).__name__}: {e}"[:200]))
    return dataclasses.replace(report, rule=found)


# -- check_rules -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RuleRow:
    """One rule (or primitive) at one call site: every call there checked locally.

    Attributes:
      kind, name, primal, file, line, rule_file, rule_line: as in RuleFinding.
      verdict: "ok" | "kink" | "wrong" | "unresolved" | "skipped" (the worst over its calls).
      calls: how many times it ran (loop iterations, cond branches, repeated layers count).
      max_rel_error: the largest relative error of its local derivatives.
      first_wrong: the context of its first wrong call ("scan iteration 3"), if any.
      why: for unresolved or skipped rows, why.
    """

    kind: str
    name: str
    primal: str | None
    file: str | None
    line: int | None
    rule_file: str | None
    rule_line: int | None
    library: str | None
    stack: tuple[str, ...]
    verdict: str
    calls: int
    max_rel_error: float
    first_wrong: str | None = None
    why: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.file else "-"


_ORDER = (Verdict.WRONG, Verdict.UNRESOLVED, Verdict.SKIPPED, Verdict.KINK, Verdict.OK)


@dataclasses.dataclass(frozen=True)
class RulesReport:
    """The audit of every derivative rule a function uses at some inputs (`check_rules`).

    Attributes:
      ok: no rule is wrong and none is unresolved.
      rows: one RuleRow per rule (or primitive) and call site, custom rules first.
      n_equations: equations checked; seconds: wall time.
      finding: the first wrong equation in program order, as check_grad would name it.
      note: why the audit is not ok although no row says so (f's output is not finite).
    """

    ok: bool
    rows: tuple[RuleRow, ...]
    n_equations: int
    seconds: float
    finding: fd.RuleFinding | None = None
    note: str | None = None

    @property
    def wrong(self) -> tuple[RuleRow, ...]:
        return tuple(r for r in self.rows if r.verdict == Verdict.WRONG)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"ok": self.ok, "rows": [dataclasses.asdict(r) for r in self.rows],
                          "n_equations": self.n_equations, "seconds": self.seconds,
                          "finding": None if self.finding is None else self.finding.to_dict(),
                          "note": self.note})

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return format_rules(self)


def format_rules(r: RulesReport) -> str:
    n_custom = sum(1 for row in r.rows if row.kind != "primitive")
    verdict = "ok" if r.ok else "WRONG" if r.wrong else "NOT FINITE" if r.note else "UNRESOLVED"
    head = (f"jgc rules check: {verdict} "
            f"({len(r.rows)} rules and call sites, {n_custom} custom; {r.n_equations} "
            f"equations checked locally, {r.seconds:.2f} s)")
    cols = ("rule", "kind", "called at", "defined at", "calls", "max rel err", "verdict")
    rows = [(row.name + (f" (of {row.primal})" if row.primal and row.primal != row.name
                         else ""), row.kind, row.where,
             f"{row.rule_file}:{row.rule_line}" if row.rule_file else "-", str(row.calls),
             f"{row.max_rel_error:.1e}",
             row.verdict + (f" ({row.first_wrong})" if row.first_wrong else "")
             + (f": {row.why}" if row.why and row.verdict != Verdict.OK else ""))
            for row in r.rows]
    widths = [max(len(c), *(len(x[i]) for x in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    lines = [head, "", "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(x, widths)).rstrip() for x in rows]
    if r.finding is not None and r.finding.found:
        lines += ["", *fd.text_lines(r.finding)]
    if r.note:
        lines += ["", f"note: {r.note}"]
    return "\n".join(lines)


def _row(first: eq.Unit, results: list[tuple[eq.Unit, Local]]) -> RuleRow:
    d = fd.describe(first)
    verdict = min((loc.verdict for _, loc in results), key=_ORDER.index)
    wrong = next((u for u, loc in results if loc.verdict == Verdict.WRONG), None)
    why = next((loc.why for _, loc in results if loc.verdict == verdict and loc.why), None)
    return RuleRow(**d, verdict=verdict, calls=len(results),
                   max_rel_error=max(loc.max_rel_error for _, loc in results),
                   first_wrong=" > ".join(wrong.context) if wrong and wrong.context else None,
                   why=why)


def audit(closed, args, active_args, seed: int = 0) -> RulesReport:
    start = time.perf_counter()
    groups: dict[tuple, list] = {}
    first = None
    n = 0
    tape, active, live = _recorded(closed, args, active_args,
                                   [True] * len(closed.jaxpr.outvars))
    checked = [(unit, local) for items in _batches(_checked_units(tape, active, live), seed)
               for (unit, *_), local in zip(items, check_units(items))]
    for unit, local in checked:
        n += 1
        d = fd.describe(unit)
        groups.setdefault((d["kind"], d["name"], d["file"], d["line"]), []).append((unit, local))
        if first is None and local.verdict == Verdict.WRONG:
            first = fd.finding(unit, local, n, 0.0)
    rows = [_row(units[0][0], units) for units in groups.values()]
    rows.sort(key=lambda r: (r.kind == "primitive", _ORDER.index(r.verdict)))
    seconds = time.perf_counter() - start
    if first is not None:
        first = dataclasses.replace(first, n_checked=n, seconds=seconds, custom_first=False)
    ok = all(r.verdict in (Verdict.OK, Verdict.KINK, Verdict.SKIPPED) for r in rows)
    note = None
    if not all(np.isfinite(np.asarray(x)).all() for x in tape.outputs if eq.inexact(x)):
        ok, note = False, NOT_FINITE
    return RulesReport(ok, tuple(rows), n, seconds, first, note)


def check_rules(f, *args, x64: bool = True, seed: int = 0) -> RulesReport:
    """Audits every custom rule and primitive `f` uses at `args`: each equation's derivative,
    as autodiff computes it, against finite differences of its own output at the values it
    received.

    Args:
      f: `f(*args)`, a JAX function returning arrays (a pytree of them).
      *args: pytrees; their floating-point array leaves are differentiated, the others fixed.
      x64: evaluate in float64 (default), restoring the global setting afterwards.
      seed: seeds the random directions and cotangents.

    Returns:
      A `RulesReport`: `.ok`, `.rows` (one per rule and call site, with its verdict),
      `print(report)` shows the table.

    Raises:
      InputError: f is not callable, cannot be traced by JAX at these arguments, or none of
        them is a floating-point array.

    Examples:
      >>> import jax.numpy as jnp, jgc
      >>> jgc.check_rules(lambda x: jnp.sum(jnp.sin(x) * x), jnp.arange(3.0)).ok
      True
    """
    from jgc._src.evaluators import calls
    from jgc._src.stages.prepare import precision

    calls.require_function(f, "f", "(*args) -> arrays", "check_rules(f, *args)")
    with precision(x64) as prec:
        leaves, tree = jax.tree_util.tree_flatten(args)
        leaves = [_promoted(x, prec.effective) for x in leaves]
        arrays = [k for k, x in enumerate(leaves) if isinstance(x, jax.Array)]
        flat = [leaves[k] for k in arrays]  # the rest (functions, strings) held as they are

        def call(*xs):
            full = list(leaves)
            for k, x in zip(arrays, xs):
                full[k] = x
            return f(*jax.tree_util.tree_unflatten(tree, full))

        try:
            closed = jax.make_jaxpr(call)(*flat)
        except Exception as e:  # noqa: BLE001 - the user's code
            raise InputError(f"check_rules needs a function JAX can trace, but tracing f(*args) "
                             f"raised {calls.first_line(e)}") from e
        active = [jnp.issubdtype(x.dtype, jnp.floating) for x in flat]
        if not any(active):
            raise InputError("check_rules(f, *args) found no floating-point array among args: "
                             "there is nothing to differentiate.")
        return audit(closed, flat, active, seed)


def _promoted(x, x64: bool):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        x = jnp.asarray(x)
        if x64 and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(jnp.float64)
    return x
