"""The notebook view (_repr_html_) and report.plot()."""

import numpy as np
import pytest

import jgc
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
