"""The Report's text view: the table of leaves, the numbers' formats, and the classic number.

report.py's `Report.__str__` calls `format_report`; render.py's HTML reuses its cells.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from jgc._src.report.vocab import Status, Verdict
from jgc._src.stages.split import short_dtype

if TYPE_CHECKING:  # types only: report.py imports this module
    from jgc._src.report.report import LeafReport, Report


def fmt_num(x: float | complex | None) -> str:
    """A value in the tables: six significant digits; a complex one as '5-4j'."""
    if x is None:
        return "-"
    if isinstance(x, complex):
        return f"{x.real:.6g}{'-' if np.signbit(x.imag) else '+'}{abs(x.imag):.6g}j"
    if x == 0:
        return "0"
    return f"{x: .6e}"


def fmt_path(path: str) -> str:
    return path or "<params>"


_COLUMNS = ("leaf", "shape", "checked", "max rel err", "worst index", "numerical",
            "{source}", "jax.grad", "status")


def format_report(r: Report) -> str:
    """The text view: a header, one row per leaf, the classic number, then the diagnosis."""
    headline = Verdict(r.verdict).headline
    summary = r.summary
    lines = [
        f"jgc {'gradient' if r.noun == 'gradient' else r.noun} check: {headline} ({summary})",
        f"checking: {r.checked_source} | precision: {r.precision} | method: {r.method} "
        f"| step: {r.step}",
        (f"mode: {r.mode}, {r.n_checked} entries checked ({r.n_params} outputs over each "
         f"direction), {r.n_evaluations} evaluations, {r.seconds:.2f} s"
         if r.mode in ("jvp", "hvp") else
         f"mode: {r.mode}, {r.n_checked} of {r.n_params} entries checked, {r.n_evaluations} "
         f"loss evaluations, {r.seconds:.2f} s")
        + ("" if r.noise is None else f" | loss noise: {r.noise:.1e}"),
        "",
    ]
    show_jax = r.checked_source != r.autodiff_name
    cols = [c.format(source=r.checked_source) for c in _COLUMNS]
    cols[7] = r.autodiff_name
    if not show_jax:
        del cols[7]
    rows = []
    for leaf in r.leaves:
        row = leaf_cells(leaf)
        if not show_jax:
            del row[7]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    lines += ["", f"global relative error: {r.global_rel_error:.2e}  ({_classic_scale(r)})", ""]
    lines.append(r.diagnosis)
    if r.rule is not None:  # the wrong rule, localised (jgc/_src/localize)
        lines += ["", str(r.rule)]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def leaf_status(leaf: LeafReport) -> str:
    """The status cell, the same in the text and HTML views: MISMATCH (3/12), ok, ..."""
    status = Status(leaf.status)
    if leaf.n_mismatch and status != Status.SKIPPED:
        return f"{status.label} ({leaf.n_mismatch}/{leaf.n_checked})"
    return status.cell.format(
        label=status.label, reason=leaf.reason, resolution=pct(leaf.resolution),
        own_dtype=leaf.own_dtype, own_n_bad=leaf.own_n_bad, size=math.prod(leaf.shape),
        kinks=f" ({leaf.n_kink} at kinks)" if leaf.n_kink else "")


def leaf_cells(leaf: LeafReport) -> list[str]:
    """One leaf's row, the same in the text and HTML views: leaf, shape, checked, max rel err,
    worst index, numerical, checked gradient, jax.grad, status."""
    if leaf.status == Status.SKIPPED:
        return [fmt_path(leaf.path), _shape(leaf), "0", "-", "-", "-", "-", "-",
                leaf_status(leaf)]
    checked = str(leaf.n_checked) + (f"+{leaf.directions}dir" if leaf.directions else "")
    return [fmt_path(leaf.path), _shape(leaf), checked, f"{leaf.max_rel_error:.1e}",
            "-" if leaf.worst_index is None else str(leaf.worst_index),
            fmt_num(leaf.numerical), fmt_num(leaf.checked), fmt_num(leaf.autodiff),
            leaf_status(leaf)]


def pct(x: float | None) -> str:
    """A relative size as a percentage; 100% or more (or unknown) as '≥100%'."""
    if x is None or not np.isfinite(x) or x >= 1:
        return "≥100%"
    return f"{100 * x:.2g}%"


def _shape(leaf: LeafReport) -> str:
    if leaf.dtype is None:
        return "-"
    return f"{short_dtype(leaf.dtype)}[{','.join(map(str, leaf.shape))}]"


def _classic_scale(r: Report) -> str:
    """What the classic single number means (CS231n's rule of thumb), at this precision."""
    if "float64" in r.precision or "complex128" in r.precision:
        return ("the classic single number: in float64 < 1e-7 is expected for a correct "
                "smooth loss, 1e-7..1e-4 is suspicious, > 1e-2 is almost surely a bug; kinks "
                "raise it without any bug, which is why jgc judges each entry instead")
    return ("the classic single number: in float32 even a correct gradient only reaches "
            "~1e-3..1e-5, so the float64 thresholds (1e-7) do not apply; jgc judges each entry "
            "against its own error estimate instead")
