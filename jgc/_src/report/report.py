"""The Report: a frozen record of one check, and its text and dict views."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

import numpy as np

from jgc._src.report.render import plot, to_html
from jgc._src.report.text import format_report
from jgc._src.report.vocab import Status


@dataclasses.dataclass(frozen=True, eq=False)
class LeafReport:
    """The result for one leaf of params.

    Attributes:
      path: `jax.tree_util.keystr` of the leaf's path, e.g. `['W1']` or `[0]['W']`.
      shape: the leaf's shape.
      dtype: the leaf's dtype name (None for a non-array leaf).
      n_checked: how many entries were checked (0 for skipped leaves).
      status: "ok" | "kink" | "mismatch" | "unresolved" | "precision" | "skipped".
        "unresolved": finite differences could not tell this leaf's gradient from one 2x too
        large, its negative or zero (`resolution` >= 100%), so nothing was verified.
        "precision": right in float64, but non-finite or inaccurate at the precision the model
        runs in (see own_dtype).
      max_rel_error: the largest element-wise relative error over the checked entries.
      worst_index: a tuple index into the leaf (the worst mismatch, else the largest error).
      numerical, checked, autodiff: the three values at worst_index (autodiff is jax.grad; None
        where jax.grad is unavailable or is itself the gradient being checked).
      n_mismatch, n_kink: how many checked entries are mismatches, and sit on kinks.
      pattern, factor: None or "scale" | "sign" | "transpose" | "regularization" | "zero" |
        "nonfinite" | "conjugate" (complex leaves: the checked gradient is the conjugate of the
        right one); the factor (checked / numerical) for scale and sign, the coefficient for
        regularization.

    Complex leaves (dtype complex64/complex128) are checked along the real and the imaginary
    direction of each entry: n_checked, n_mismatch and n_kink count those directions (two per
    entry), while worst_index indexes the leaf itself and the values at it are complex, in JAX's
    convention df/dx - i df/dy (what jax.grad of a real loss returns); a part that was not
    checked is NaN. to_dict() writes a complex value as {"real": ..., "imag": ...}.
      autodiff_status: how jax.grad compares with the numerical derivative on this leaf.
      reason: why the leaf was skipped.
      worst: up to five (index, numerical, checked, autodiff) rows, worst first.
      resolution: the smallest relative error of this leaf's gradient that the check would
        detect (a scale error of the whole leaf; for single entries, at the best-resolved one).
      directions: random directions tested (mode "directional"); n_checked then counts the
        entries checked one by one (a sample, and the suspects group testing left).
      n_nonfinite: checked entries that are NaN or Inf (always mismatches).
      unexplained_excess: the leaf-level test (reduced precision) found residuals beyond noise
        that no systematic pattern explains: kinks crossed by the steps, not a gradient bug;
        its resolution then says how large a factor must be to stand out of that scatter.
      direction_kinks: random directions (mode "directional") along which the loss has kinks
        that the finest step could not clear; the checked value lay between the one-sided
        slopes there.
      n_tie: of the kink entries, those at a tie: several elements at their kinks at once,
        where the checked value is a convention outside the one-sided slopes (counted in
        n_kink too).
      autodiff_disagrees: jax.grad and the checked gradient differ beyond the error bar
        somewhere in this leaf (said in the diagnosis when the leaf is unresolved).
      zero: the gradient is zero, verified in absolute terms: zero to rounding on the scale of
        the whole gradient, and finite differences consistent with zero (a parameter the loss
        does not depend on). Its resolution is then None: a zero has no relative error.
      n_rough: entries finite differences could not judge (the loss is not smooth at the
        step's scale there, or kinks the steps crossed unseen may explain the disagreement):
        not verified, and the leaf is unresolved.
      limited_by: for an unresolved leaf, what limits finite differences there: "rounding" (the
        loss's rounding noise is as large as the change a step makes) or "truncation" (the loss
        varies on a scale finer than the step: an oscillation, or a forward accurate to only a
        few digits) or "kinks" (a few entries disagree, no more than the entries found at kinks:
        kinks the steps crossed unseen may explain them, and x64=True decides).
      own_dtype, own_n_bad, own_n_nonfinite, own_worst, own_autodiff_too: when x64 promoted the
        model's float32 (or half, or complex64) inputs, the checked gradient was also evaluated
        at that precision, the one the model runs in. Where it is non-finite or off by more than
        half that precision's digits (status "precision": right in float64, wrong there), these
        say at which dtype, how many entries, the worst (index, float64 value, value at
        own_dtype), and whether jax.grad fails there the same way.
      rel_errors: the element-wise relative errors, shaped like the leaf (NaN where an entry
        was not checked); what report.plot() draws. Not part of to_dict().
    """

    path: str
    shape: tuple[int, ...]
    dtype: str | None
    n_checked: int
    status: str
    max_rel_error: float = 0.0
    worst_index: tuple[int, ...] | None = None
    numerical: float | complex | None = None  # complex for a complex leaf (JAX's convention)
    checked: float | complex | None = None
    autodiff: float | complex | None = None
    n_mismatch: int = 0
    n_rough: int = 0
    n_kink: int = 0
    pattern: str | None = None
    factor: float | None = None
    autodiff_status: str | None = None
    reason: str = ""
    worst: tuple[tuple[Any, ...], ...] = ()
    resolution: float | None = None
    directions: int = 0
    n_nonfinite: int = 0
    n_tie: int = 0
    direction_kinks: int = 0
    unexplained_excess: bool = False
    autodiff_disagrees: bool = False
    zero: bool = False
    limited_by: str | None = None
    own_dtype: str | None = None
    own_n_bad: int = 0
    own_n_nonfinite: int = 0
    own_worst: tuple[Any, ...] | None = None
    own_autodiff_too: bool | None = None
    rel_errors: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Verified (ok, or a kink whose value lies between the one-sided slopes) or skipped."""
        return Status(self.status).verified

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "rel_errors"}
        d["shape"] = list(self.shape)
        d["worst_index"] = None if self.worst_index is None else list(self.worst_index)
        d["worst"] = [[list(r[0]), *r[1:]] for r in self.worst]
        return _jsonable(d)


@dataclasses.dataclass(frozen=True, eq=False)
class Report:
    """The result of a gradient check.

    Attributes:
      ok: no leaf is a mismatch (kinks are not failures).
      verdict: "ok" | "wrong_gradient" | "suspect_numerics" | "disagreement" | "randomness" |
        "unresolved" | "precision" (right in float64, wrong at the model's own precision).
      leaves: one LeafReport per leaf of params, in tree order (skipped leaves included).
      global_rel_error: the classic ||g - g_num|| / (||g|| + ||g_num||) over all checked entries.
      diagnosis: a plain-language explanation and the next step.
      checked_source: "hand-written" or "jax.grad": which gradient was checked.
      precision: the evaluation dtype, e.g. "float64 (x64)".
      method: how the numerical derivative was computed.
      mode: "full", "sample" or "directional" ("auto" resolves to one of them); "jvp" or
        "hvp" for check_jvp and check_hvp.
      step: the step rule, e.g. "h = 6.1e-06·max(1,|θ|)".
      n_params: checked entries in params; n_checked: entries actually checked.
      n_evaluations: loss evaluations made; seconds: wall time of the check.
      notes: one-line remarks (the slow NumPy path, jax.grad unavailable, sampling, ...).
      noise: the measured noise level (standard deviation) of one loss evaluation, or None.
      rule: when jax.grad was found wrong, the equation localisation names (a RuleFinding:
        the primitive or custom rule, its file:line, the input, both derivatives), or why none
        was named; None when jax.grad was not found wrong.
    """

    ok: bool
    verdict: str
    leaves: tuple[LeafReport, ...]
    global_rel_error: float
    diagnosis: str
    checked_source: str
    precision: str
    method: str
    mode: str
    step: str
    n_params: int
    n_checked: int
    n_evaluations: int
    seconds: float
    notes: tuple[str, ...] = ()
    noise: float | None = None
    autodiff_name: str = "jax.grad"  # jax's own opinion: jax.grad, jax.jvp, jax's H·v
    noun: str = "gradient"  # what is checked: gradient, tangent rule, Hessian-vector product
    rule: Any = None  # localize.findings.RuleFinding

    @property
    def bad_leaves(self) -> tuple[LeafReport, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.status == Status.MISMATCH)

    @property
    def unresolved_leaves(self) -> tuple[LeafReport, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.status == Status.UNRESOLVED)

    @property
    def precision_leaves(self) -> tuple[LeafReport, ...]:
        """Leaves right in float64 but wrong at the precision the model runs in."""
        return tuple(leaf for leaf in self.leaves if leaf.status == Status.PRECISION)

    @property
    def summary(self) -> str:
        """'1 of 4 checked leaves mismatch', 'all 4 checked leaves agree', ..."""
        n = sum(1 for leaf in self.leaves if leaf.status != Status.SKIPPED)
        own = next((leaf.own_dtype for leaf in self.precision_leaves), None)
        parts = [f"{len(group)} of {n} checked leaves {word}"
                 for group, word in ((self.bad_leaves, "mismatch"),
                                     (self.precision_leaves, f"fail in {own}"),
                                     (self.unresolved_leaves, "unresolved")) if group]
        return ", ".join(parts) if parts else f"all {n} checked leaves agree"

    def leaf(self, path: str) -> LeafReport:
        """The LeafReport for a path, e.g. report.leaf("['W1']")."""
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        raise KeyError(f"no leaf {path!r}; paths are {[leaf.path for leaf in self.leaves]}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "leaves"}
        d["leaves"] = [leaf.to_dict() for leaf in self.leaves]
        d["rule"] = None if self.rule is None else self.rule.to_dict()
        d["notes"] = list(self.notes)
        return _jsonable(d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return format_report(self)

    def _repr_html_(self) -> str:
        """The notebook view: coloured verdict and status, the table, the diagnosis."""
        return to_html(self)

    def plot(self, path=None):
        """A matplotlib figure: max relative error per leaf (log scale, with the classic
        thresholds) and a relative-error heatmap per 2-D leaf. Saved to `path` if given.
        Needs the optional extra: pip install 'jgc[plot]'."""
        return plot(self, path)

    def __repr__(self) -> str:
        bad = ", ".join(leaf.path for leaf in self.bad_leaves)
        return (f"Report(ok={self.ok}, verdict={self.verdict!r}, leaves={len(self.leaves)}"
                + (f", bad=[{bad}]" if bad else "") + f", global_rel_error="
                f"{self.global_rel_error:.1e})")


def _jsonable(x):
    if isinstance(x, enum.Enum):  # the vocabularies serialise as their plain strings
        return x.value
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else str(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (complex, np.complexfloating)):  # a complex leaf's value: JSON has none
        return {"real": _jsonable(x.real), "imag": _jsonable(x.imag)}
    return x
