"""The notebook view (_repr_html_), report.plot(), and the leaf row shared by text and HTML."""

import html

import numpy as np
import pytest

import jgc
from jgc._src.report.render import to_html
from jgc._src.report.report import LeafReport
from jgc._src.report.text import leaf_cells, leaf_status
from jgc._src.report.vocab import Status, Verdict
from jgc.examples import mlp


@pytest.fixture(scope="module")
def bad_report():
    ex = mlp("tanh")
    return jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["W1_transposed"].grad)


def test_html_has_verdict_table_and_diagnosis(bad_report):
    page = bad_report._repr_html_()
    assert "MISMATCH" in page and "#cf222e" in page  # the coloured verdict
    assert page.count("<tr>") == 1 + len(bad_report.leaves)
    assert "[&#x27;W1&#x27;]" in page  # paths are escaped
    assert "is the transpose of the right gradient" in page
    assert "global relative error" in page
    ok = jgc.check_grad(*(lambda e: (e.loss, e.params, *e.args))(mlp("tanh")),
                        grad=mlp("tanh").grad)._repr_html_()
    assert "#1a7f37" in ok and "MISMATCH" not in ok


def test_rel_errors_kept_for_plots_not_in_dict(bad_report):
    leaf = bad_report.leaf("['W1']")
    assert leaf.rel_errors.shape == (5, 5)
    diag = np.diag(leaf.rel_errors)
    off = leaf.rel_errors[~np.eye(5, dtype=bool)]
    assert diag.max() < 1e-6 < off.min()  # a transpose: right diagonal, wrong elsewhere
    assert "rel_errors" not in bad_report.to_dict()["leaves"][0]


def test_plot_saves_a_figure(bad_report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    fig = bad_report.plot(path)
    assert path.stat().st_size > 10_000
    assert len(fig.axes) == 1 + 2 + 2  # bars, two heatmaps (W1, W2) and their colorbars
    bars = fig.axes[0]
    assert bars.get_yscale() == "log"
    assert [t.get_text() for t in bars.get_xticklabels()] == ["['W1']", "['W2']", "['b1']",
                                                              "['b2']"]


# -- the leaf row -----------------------------------------------------------------------------

ROWS = [
    (LeafReport("['W']", (3, 2), "float32", 6, Status.MISMATCH, max_rel_error=0.5,
                worst_index=(1, 0), numerical=2.0, checked=3.0, autodiff=2.0, n_mismatch=2),
     ["['W']", "f32[3,2]", "6", "5.0e-01", "(1, 0)", " 2.000000e+00", " 3.000000e+00",
      " 2.000000e+00", "MISMATCH (2/6)"]),
    (LeafReport("['b']", (3,), "float32", 3, Status.MISMATCH, max_rel_error=0.01),
     ["['b']", "f32[3]", "3", "1.0e-02", "-", "-", "-", "-", "MISMATCH (as a whole)"]),
    (LeafReport("", (4,), "float64", 4, Status.UNRESOLVED, max_rel_error=0.1, resolution=3.0),
     ["<params>", "f64[4]", "4", "1.0e-01", "-", "-", "-", "-", "UNRESOLVED (resolution ≥100%)"]),
    (LeafReport("['k']", (8,), "float64", 8, Status.KINK, n_kink=2, directions=2),
     ["['k']", "f64[8]", "8+2dir", "0.0e+00", "-", "-", "-", "-", "kink (2 at kinks)"]),
    (LeafReport("['n']", (), "int32", 0, Status.SKIPPED, reason="not a float array"),
     ["['n']", "i32[]", "0", "-", "-", "-", "-", "-", "skipped (not a float array)"]),
]


@pytest.mark.parametrize("leaf, cells", ROWS, ids=[r[0].status for r in ROWS])
def test_one_leaf_row_for_text_and_html(leaf, cells):
    """The row is pinned, and both views print exactly it (the text view once diverged from
    the HTML one: 'f32[3] ... MISMATCH (as a whole)' against 'float32[3] ... MISMATCH')."""
    assert leaf_cells(leaf) == cells and leaf_status(leaf) == cells[-1]
    report = jgc.Report(ok=False, verdict=Verdict.WRONG_GRADIENT, leaves=(leaf,),
                        global_rel_error=0.1, diagnosis="", checked_source="hand-written",
                        precision="float64", method="central", mode="full", step="h",
                        n_params=6, n_checked=6, n_evaluations=12, seconds=0.1)
    text_row = str(report).splitlines()[5]
    assert text_row.split() == " ".join(cells).split()
    page = to_html(report)
    for cell in cells:
        assert f">{html.escape(cell)}</td>" in page
    assert Status(leaf.status).colour in page


def test_statuses_and_verdicts_have_their_colours_in_html():
    ex = mlp("tanh")
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["b1_4_over_m"].grad)
    page = r._repr_html_()
    assert Verdict.WRONG_GRADIENT.colour in page and ">MISMATCH</span>" in page
    assert page.count(Status.OK.colour) >= 3  # the three correct leaves
