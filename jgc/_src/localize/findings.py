"""What localisation found, as the Report carries it: `RuleFinding`, and its words."""

from __future__ import annotations

import dataclasses
from typing import Any

from jgc._src.localize import equations as eq
from jgc._src.localize import source
from jgc._src.localize.equations import Unit
from jgc._src.localize.local import Local
from jgc._src.report.report import _jsonable

KINDS = {"custom_jvp_call": "custom_jvp", "custom_vjp_call": "custom_vjp",
         "custom_vjp_call_jaxpr": "custom_vjp"}


@dataclasses.dataclass(frozen=True)
class RuleFinding:
    """The first equation, in program order, whose autodiff derivative disagrees with finite
    differences of its own output at the values it received (`found`), or why none was named.

    Attributes:
      found: an equation was named. Otherwise only `summary` (why not) and the cost are set.
      kind: "primitive", "custom_jvp", "custom_vjp", "loop" (a scan or while loop too long
        to unroll, checked as one equation), "branch" (a comparison at its boundary) or
        "nonfinite" (an equation making a NaN the program discards; `found` is False).
      name: the primitive's name, or the rule's Python function (the jvp; the bwd of a
        custom_vjp).
      primal: the custom rule's primal function (None for a primitive).
      file, line: where the equation was written (the user's code, else a library's).
      rule_file, rule_line: where the rule function is defined (custom rules); for a branch,
        where the select or cond it decides is.
      library: for an equation written by a library built on jax (jax.nn.logsumexp), its
        function and line there ("logsumexp at jax/_src/ops/special.py:87").
      stack: the user's calls that led to it, innermost first ("dense (model.py:24)",
        "mlp (model.py:29)", "loss (model.py:33)").
      inputs: the inputs whose derivative is wrong, by name where jax recorded one, else by
        position ("input 1").
      autodiff, numerical: the two derivatives along the worst probe (a random direction
        and cotangent: <c, dF u>).
      pattern, factor: autodiff against finite differences ("scale" 2.0, "sign", "zero").
      context: where the equation sits ("jit inner", "scan iteration 3", "cond branch 1").
      iteration, branch: the loop iteration and the cond branch, when inside one.
      n_checked: equations checked locally; seconds: what localisation cost.
      note: how the disagreement showed, when not plainly (a cotangent scaled up).
      summary: one line saying what was found.
    """

    found: bool
    summary: str
    kind: str | None = None
    name: str | None = None
    primal: str | None = None
    file: str | None = None
    line: int | None = None
    rule_file: str | None = None
    rule_line: int | None = None
    library: str | None = None
    stack: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    autodiff: float | None = None
    numerical: float | None = None
    pattern: str | None = None
    factor: float | None = None
    context: tuple[str, ...] = ()
    iteration: int | None = None
    branch: int | None = None
    n_checked: int = 0
    seconds: float = 0.0
    note: str | None = None
    custom_first: bool = True  # the order equations were checked in (see text_lines)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return _jsonable(d)

    def __str__(self) -> str:
        return "\n".join(text_lines(self))


def describe(unit: Unit) -> dict[str, Any]:
    """The names and places of a unit: kind, name, primal, file, line, rule_file, rule_line."""
    eqn = unit.eqn
    site = source.call_site(eqn, unit.callers)
    kind = KINDS.get(unit.name, "loop" if unit.name in ("scan", "while") else "primitive")
    lib = source.library_site(eqn, unit.callers)
    stack = tuple(f"{p.name} ({source.short_file(p.file)}:{p.line})"
                  for p in source.user_stack(eqn, unit.callers))
    out = dict(kind=kind, name=unit.name, primal=None, file=source.short_file(site.file),
               line=site.line, rule_file=None, rule_line=None,
               library=None if lib is None else
               f"{lib.name} at {source.short_file(lib.file)}:{lib.line}", stack=stack)
    if kind != "primitive":
        places = source.rule_places(eqn)
        rule = places.get("jvp") or places.get("bwd") or places.get("fwd")
        primal = places.get("primal")
        out["primal"] = primal.name if primal else None
        if rule is not None:
            out.update(name=rule.name, rule_file=source.short_file(rule.file),
                       rule_line=rule.line)
        else:
            out["name"] = out["primal"] or unit.name
    return out


def input_names(unit: Unit, positions: tuple[int, ...]) -> tuple[str, ...]:
    names = source.arg_names(unit.eqn)
    return tuple(f"input {k} ({names[k]})" if names else f"input {k}" for k in positions)


def finding(unit: Unit, local: Local, n_checked: int, seconds: float) -> RuleFinding:
    """The RuleFinding naming `unit`, which its local check found wrong."""
    d = describe(unit)
    bad = local.status == "mismatch"
    worst = int(max(range(len(bad)), key=lambda j: (bad[j], local.inputs[j] is not None,
                                                   abs(local.autodiff[j]
                                                       - local.numerical[j]))))
    f = RuleFinding(True, "", **d, inputs=input_names(unit, local.wrong_inputs),
                    autodiff=float(local.autodiff[worst]),
                    numerical=float(local.numerical[worst]),
                    pattern=None if local.pattern is None else str(local.pattern),
                    factor=local.factor, context=unit.context, iteration=unit.iteration,
                    branch=unit.branch, n_checked=n_checked, seconds=seconds,
                    note=local.why)
    return dataclasses.replace(f, summary=headline(f))


def boundary_finding(unit: Unit, moved: tuple[int, ...], select, n_checked: int,
                     seconds: float) -> RuleFinding:
    """The RuleFinding for a comparison at its boundary deciding a branch (boundary.py)."""
    d = describe(unit)
    if select is not None:
        site = source.call_site(select.eqn, getattr(select, "callers", ()))
        d.update(rule_file=source.short_file(site.file), rule_line=site.line)
    f = RuleFinding(True, "", **d, inputs=input_names(unit, moved), pattern="boundary",
                    context=unit.context, iteration=unit.iteration, branch=unit.branch,
                    n_checked=n_checked, seconds=seconds)
    decides = "" if select is None else f" and decides a `{select.eqn.primitive.name}`"
    return dataclasses.replace(f, kind="branch", summary=(
        f"no derivative rule is wrong, but a piecewise definition sits at its boundary: the "
        f"comparison `{unit.name}`{' at ' + f.file + ':' + str(f.line) if f.file else ''} "
        f"changes within the finite-difference step{decides}. jax.grad differentiates the "
        "branch taken, whose derivative here is not the function's (finite differences see "
        "the other side); give the boundary point the derivative of the whole function (a "
        "custom_jvp, or a branch condition that excludes it)"))


def nonfinite_finding(unit: Unit, n_checked: int, seconds: float) -> RuleFinding:
    """No rule is wrong, but `unit` makes a NaN or Inf that the program discards."""
    f = RuleFinding(False, "", **describe(unit), context=unit.context,
                    iteration=unit.iteration, branch=unit.branch, n_checked=n_checked,
                    seconds=seconds)
    where = f" at {f.file}:{f.line}" if f.file else ""
    return dataclasses.replace(f, kind="nonfinite", summary=(
        f"no rule is wrong, but `{unit.name}`{where} makes a NaN or Inf from finite inputs, "
        "in a value the program discards (a jnp.where branch not taken, say): autodiff "
        "multiplies that branch's zero cotangent by it, and 0 times NaN is NaN. Keep the "
        "branch not taken finite (guard its input: log(where(x < 1, 1 - x, 1)))"))


def unjudged_finding(unit: Unit, local: Local, n_checked: int, seconds: float
                     ) -> RuleFinding:
    """No equation found wrong, but `unit` could not be judged: named, not blamed."""
    f = RuleFinding(False, "", **describe(unit), context=unit.context,
                    iteration=unit.iteration, branch=unit.branch, n_checked=n_checked,
                    seconds=seconds, note=local.why)
    where = f" at {f.file}:{f.line}" if f.file else ""
    if (local.why or "").startswith("autodiff raised"):
        # A rule closing over a traced array of the loss (nondiff_argnums given an array) is
        # a dead tracer outside the loss's trace: it cannot be evaluated on its own.
        because = "its rule cannot be evaluated outside the loss's own trace"
    else:
        because = ("a derivative that is infinite or undefined there (sqrt or a norm at 0) "
                   "makes autodiff's chain rule give NaN or Inf without any rule being wrong")
    return dataclasses.replace(f, summary=(
        f"no equation is found wrong, but {what(f)}{where} could not be judged "
        f"({local.why}): {because}"))


def what(f: RuleFinding) -> str:
    """'the custom_jvp rule `f_jvp` of `f`', 'the primitive `rem`'."""
    if f.kind == "primitive":
        return f"jax's rule for the primitive `{f.name}`"
    if f.kind == "loop":
        return (f"a `{f.name}` loop (too long to unroll, beyond {eq.MAX_ITERATIONS} "
                "iterations: its body was checked as one equation)")
    of = f" of `{f.primal}`" if f.primal and f.primal != f.name else ""
    rule = "rule" if f.kind == "custom_jvp" else "backward rule"
    return f"the {f.kind} {rule} `{f.name}`{of}"


def headline(f: RuleFinding) -> str:
    where = f" at {f.file}:{f.line}" if f.file else ""
    inside = ""
    if f.iteration is not None:
        inside += f", in loop iteration {f.iteration}"
    if f.branch is not None:
        inside += f", in cond branch {f.branch}"
    return f"wrong derivative rule: {what(f)}, called{where}{inside}"


def pattern_words(f: RuleFinding) -> str:
    if f.pattern == "scale" and f.factor is not None:
        return f"; autodiff is {f.factor:.4g}x finite differences"
    if f.pattern == "sign":
        return "; autodiff has the wrong sign"
    if f.pattern == "zero":
        return "; autodiff is zero"
    return ""


def text_lines(f: RuleFinding) -> list[str]:
    """The paragraph in the text report."""
    cost = (f"{f.n_checked} equation{'s' if f.n_checked != 1 else ''} checked locally in "
            f"{f.seconds:.2f} s")
    if not f.found:
        return [f"rule localisation: {f.summary} ({cost})"]
    lines = [f.summary]
    if len(f.stack) > 1:
        lines.append(f"  call stack: {' <- '.join(f.stack)}")
    if f.library:
        lines.append(f"  written in {f.library}")
    if f.kind == "branch":
        where = f" at {f.rule_file}:{f.rule_line}" if f.rule_file else ""
        return [*lines, f"  the branch is chosen{where}; the comparison moves with "
                        f"{', '.join(f.inputs) or 'its inputs'}",
                f"  ({cost}; none disagrees)"]
    if f.rule_file:
        lines.append(f"  rule defined at {f.rule_file}:{f.rule_line}")
    if f.context:
        lines.append(f"  inside: {' > '.join(f.context)}")
    which = ", ".join(f.inputs) or "its inputs"
    lines.append(f"  derivative w.r.t. {which}: autodiff {f.autodiff:.6e}, finite differences "
                 f"{f.numerical:.6e} (along a random direction and cotangent)"
                 f"{pattern_words(f)}")
    if f.note:
        lines.append(f"  {f.note}")
    order = "custom rules first, then primitives" if f.custom_first else "all equations"
    lines.append(f"  ({cost}: {order} in program order; those checked before it agree)")
    return lines
