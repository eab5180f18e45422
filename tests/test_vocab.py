"""The vocabularies (report/vocab.py): members that are their strings, and the choices the
command line offers."""

import pytest

from jgc._src.report.vocab import EvaluatorChoice, Method, Mode, Pattern, Status, Verdict
from jgc._src.stages.split import InputError


def test_vocabularies_are_their_strings():
    assert Status.MISMATCH == "mismatch" and f"{Verdict.OK}" == "ok" and repr(Mode.FULL) == "'full'"
    assert Mode.choices() == ("auto", "full", "sample", "directional")
    assert Method.choices() == ("central", "richardson", "complex")
    with pytest.raises(InputError, match=r"mode='fast' is not one of \('auto'"):
        Mode.parse("fast", "mode")
    assert [s for s in Status if s.verified] == [Status.OK, Status.KINK, Status.SKIPPED]


def test_the_cli_offers_every_mode_and_method():
    from jgc._src.surfaces.cli import build_parser

    check = build_parser()._subparsers._group_actions[0].choices["check"]
    opts = {a.dest: a for a in check._actions}
    assert tuple(opts["mode"].choices) == Mode.choices()
    assert tuple(opts["method"].choices) == Method.choices()


def test_every_pattern_carries_its_message():
    """Each pattern words itself (vocab.Pattern.message), with its variants: what
    explain.describe_leaf looks up instead of an if/elif chain."""
    what = "the hand-written gradient of ['W']"
    fields = {"factor": "is 2x too large", "lam": 0.25, "n": 3, "entries": "entries",
              "first": ", first at (0,)"}
    variants = {Pattern.REGULARIZATION: ("missing", "extra"), Pattern.CONJUGATE: ("", "gradient")}
    for pattern in Pattern:
        for variant in variants.get(pattern, ("",)):
            text = pattern.message(variant).format(what=what, **fields)
            assert text.startswith(what) and "{" not in text
    assert "λ ≈ 0.25" in Pattern.REGULARIZATION.message("missing").format(what=what, **fields)
    with pytest.raises(KeyError):
        Pattern.ZERO.message("missing")


def test_the_evaluator_option_is_a_vocabulary():
    assert EvaluatorChoice.choices() == ("auto", "dense")
    with pytest.raises(InputError, match=r"evaluator='fast' is not one of \('auto', 'dense'\)"):
        EvaluatorChoice.parse("fast", "evaluator")


def test_every_status_carries_its_cell():
    """Each status words its own table cell (vocab.Status.cell), which text.leaf_status fills."""
    fields = {"label": "X", "reason": "not a float array", "resolution": "40%",
              "own_dtype": "float32", "own_n_bad": 2, "size": 6, "kinks": " (1 at kinks)"}
    cells = {s: s.cell.format(**fields) for s in Status}
    assert cells[Status.SKIPPED] == "skipped (not a float array)"
    assert cells[Status.UNRESOLVED] == "X (resolution 40%)"
    assert cells[Status.PRECISION] == "X (in float32: 2/6)"
    assert cells[Status.KINK] == cells[Status.OK] == "X (1 at kinks)"
