"""Rich views of a Report: HTML for notebooks, and a matplotlib figure (the optional `plot`
extra)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np

from jgc._src.report.text import fmt_path, leaf_cells
from jgc._src.report.vocab import Status, Verdict

if TYPE_CHECKING:  # types only: report.py imports this module
    from jgc._src.report.report import Report

# The classic single-number thresholds (CS231n): below 1e-7 fine in float64, above 1e-2 almost
# surely a bug. Drawn for orientation: jgc itself judges each entry against its error bar.
THRESHOLDS = ((1e-7, "1e-7: fine (float64)"), (1e-2, "1e-2: almost surely a bug"))


def to_html(r: Report) -> str:
    e = html.escape
    verdict = Verdict(r.verdict)
    colour = verdict.colour
    head = (f'<div style="font-family:sans-serif">'
            f'<div><span style="background:{colour};color:white;padding:2px 8px;'
            f'border-radius:4px;font-weight:bold">{e(verdict.headline)}</span> '
            f'<b>jgc {e(r.noun)} check</b>: '
            f'{e(r.summary)}</div>'
            f'<div style="color:#57606a;font-size:90%">checking {e(r.checked_source)} · '
            f'{e(r.precision)} · {e(r.method)} · {e(r.step)} · mode {e(r.mode)} · '
            f'{r.n_evaluations} evaluations · {r.seconds:.2f} s</div>')
    show_ad = r.checked_source != r.autodiff_name
    cols = ["leaf", "shape", "checked", "max rel err", "worst index", "numerical",
            r.checked_source] + ([r.autodiff_name] if show_ad else []) + ["status"]
    rows = []
    for leaf in r.leaves:
        cells = leaf_cells(leaf)
        status = cells.pop()
        if not show_ad:
            del cells[7]
        tds = "".join(f'<td style="padding:2px 8px;font-family:monospace">{e(v)}</td>'
                      for v in cells)
        rows.append(f'<tr>{tds}<td style="padding:2px 8px;color:{Status(leaf.status).colour};'
                    f'font-weight:bold">{e(status)}</td></tr>')
    ths = "".join(f'<th style="padding:2px 8px;text-align:left">{e(c)}</th>' for c in cols)
    table = (f'<table style="border-collapse:collapse;margin:6px 0"><tr>{ths}</tr>'
             f'{"".join(rows)}</table>')
    classic = (f'<div style="font-size:90%">global relative error (the classic single number):'
               f' {r.global_rel_error:.2e}</div>')
    diagnosis = (f'<pre style="white-space:pre-wrap;background:#f6f8fa;padding:6px;'
                 f'border-left:4px solid {colour}">{e(r.diagnosis)}</pre>')
    notes = "".join(f"<li>{e(n)}</li>" for n in r.notes)
    if r.rule is not None:  # the wrong rule, localised (jgc/_src/localize)
        diagnosis += (f'<pre style="white-space:pre-wrap;background:#fff8c5;padding:6px;'
                      f'border-left:4px solid {colour}">{e(str(r.rule))}</pre>')
    return (head + table + classic + diagnosis
            + (f'<ul style="font-size:90%;color:#57606a">{notes}</ul>' if notes else "")
            + "</div>")


def plot(r: Report, path=None):
    """Bars of the largest relative error per leaf (log scale, classic thresholds marked) and
    a heatmap of the element-wise relative error for each 2-D leaf. Returns the Figure."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("report.plot() needs matplotlib: pip install 'jgc[plot]'") from e
    leaves = [x for x in r.leaves if x.status != Status.SKIPPED and x.n_checked]
    maps = [x for x in leaves if x.rel_errors is not None and np.ndim(x.rel_errors) == 2]
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, figsize=(4.5 + 3.5 * len(maps), 3.8), squeeze=False)
    ax = axes[0, 0]
    values = [max(x.max_rel_error, 1e-18) for x in leaves]
    ax.bar(range(len(leaves)), values, color=[Status(x.status).colour for x in leaves])
    ax.set_yscale("log")
    ax.set_xticks(range(len(leaves)))
    ax.set_xticklabels([fmt_path(x.path) for x in leaves], rotation=45, ha="right",
                       fontsize=8)
    for level, label in THRESHOLDS:
        ax.axhline(level, ls="--", lw=1, color="#57606a")
        ax.text(len(leaves) - 0.5, level, label, ha="right", va="bottom", fontsize=7,
                color="#57606a")
    ax.set_ylabel("max relative error")
    ax.set_title(f"{Verdict(r.verdict).headline}: max relative error per leaf", fontsize=9)
    for a, leaf in zip(axes[0, 1:], maps):
        data = np.log10(np.maximum(np.asarray(leaf.rel_errors, np.float64), 1e-18))
        im = a.imshow(data, cmap="magma", vmin=-16, vmax=0, aspect="auto",
                      interpolation="nearest")
        a.set_title(f"{fmt_path(leaf.path)}: log10 rel. error ({leaf.status})", fontsize=9)
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
