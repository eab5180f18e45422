"""The words: the diagnosis under a Report's table, from the leaves' statuses and patterns.

Each mismatched leaf gets one sentence naming its pattern and the likely cause (a factor of the
batch size is a missing 1/m), then its worst entries; then the notes on numerics, resolution,
kinks and ties, with advice that never repeats what the check already did.
"""

from __future__ import annotations

import dataclasses

from jgc._src.report.report import LeafReport
from jgc._src.report.text import pct
from jgc._src.report.vocab import Method, Pattern, Status, Verdict
from jgc._src.stages.diagnose import COARSE, triage
from jgc._src.stages.patterns import MIN_AGREE


def _near(a: float, b: float, rel: float = 2e-3) -> bool:
    return abs(a - b) <= rel * abs(b)


# A factor within this of 1 is a small relative error, not "1x too large": it is worded as a
# percentage (a 1.002 factor is 0.2% too large, not "a constant 1 where 1 was meant").
NEAR_ONE = 0.02
# Beyond this a factor is printed in scientific notation and no integer cause is guessed.
HUGE = 1e6


def describe_factor(a: float, batch: int | None) -> str:
    """'4× too large: ...' with the likely cause of a constant factor (any finite factor)."""
    m = abs(a)
    if a < 0:
        size = f"has the wrong sign and is {m:.3g}× the right magnitude"
    elif abs(a - 1) <= NEAR_ONE:
        side = "large" if a > 1 else "small"
        return (f"is {abs(a - 1) * 100:.2g}% too {side} (a factor {a:.4g}): a small relative "
                "error, such as a constant slightly off (a regularisation or epsilon term, a "
                "learning-rate-like scale) or a term computed at a slightly different point")
    elif m < 1 / HUGE:
        size = f"is {a:.3g}× the right value (almost zero)"
    elif a >= 1:
        size = (f"is {round(a)}× too large" if a < HUGE and _near(a, round(a))
                else f"is {a:.3g}× too large")
    else:
        inv = 1 / a
        size = (f"is {round(inv)}× too small" if inv < HUGE and _near(inv, round(inv))
                else f"is {a:.3g}× the right value (too small)")
    causes = []
    if batch and batch > 1:
        if _near(m, batch):
            causes.append(f"a 1/m averaging factor is missing (m = {batch}, the batch size)")
        elif _near(m, 1 / batch):
            causes.append(f"it is divided by the batch size m = {batch} once too often")
    if not causes:
        if _near(m, 2):
            causes.append("a factor 2 counted twice (e.g. d(x²)/dx = 2x with the 2 applied "
                          "again, or a term added twice)")
        elif _near(m, 0.5):
            causes.append("a factor 2 is missing (e.g. d(x²)/dx taken as x)")
        elif 1 < a < HUGE and _near(a, round(a)):
            causes.append(f"a constant {round(a)} where 1 was meant (e.g. {round(a)}./m "
                          "instead of 1./m, or a term counted several times)")
        else:
            causes.append("a constant factor is wrong (a 1/m missing or doubled, a 2 from a "
                          "square, a scale in the loss)")
    return f"{size}: likely {causes[0]}"


# What a mismatched leaf without a pattern shows, by the extent of its mismatch (`_extent`).
_EXTENT_MESSAGES = {
    "located": "{what} is wrong at {n} {entries} located by group testing",
    "spread": (
        "{what} fails a random-direction test (the values shown are derivatives along it), "
        "beyond its error bar and any kink along it, but group testing isolated no single wrong "
        "entry: the error is spread over many entries, each too small to show alone (a small "
        "factor or an extra term across the leaf)"),
    "systematic": (
        "{what} is systematically off: no single entry is outside its error bar, but taken "
        "together the leaf's entries differ from finite differences far more than the measured "
        "noise allows"),
    "few": (
        "{what} has the wrong value: {checked:.6g} where finite differences give "
        "{numerical:.6g} (too few entries to tell a pattern: a wrong formula, a dropped term, a "
        "rounding or a branch taken wrongly)"),
    "unpatterned": (
        "{what} is wrong in {n} of {n_checked} entries with no simple pattern (a wrong formula, "
        "a wrong index or a missing path)"),
}


def _entries(n: int) -> str:
    return f"entr{'y' if n == 1 else 'ies'}"


def _pattern_sentence(leaf: LeafReport, what: str, batch: int | None, noun: str) -> str:
    pattern = Pattern(leaf.pattern)
    variant, fields = "", {}
    if pattern == Pattern.SCALE:
        fields = {"factor": describe_factor(leaf.factor, batch)}
    elif pattern == Pattern.REGULARIZATION:
        variant = "missing" if leaf.factor < 0 else "extra"
        fields = {"lam": abs(leaf.factor) if leaf.factor < 0 else leaf.factor}
    elif pattern == Pattern.CONJUGATE:
        variant = "gradient" if noun == "gradient" else ""
    elif pattern == Pattern.NONFINITE:
        fields = {"n": leaf.n_nonfinite, "entries": _entries(leaf.n_nonfinite),
                  "first": (f", first at {leaf.worst_index}" if leaf.worst_index is not None
                            else "")}
    return pattern.message(variant).format(what=what, **fields)


def _extent(leaf: LeafReport) -> str:
    """Which of _EXTENT_MESSAGES a leaf without a pattern gets."""
    if leaf.directions:
        return "located" if leaf.n_mismatch else "spread"
    if leaf.n_mismatch == 0:
        return "systematic"
    return "few" if leaf.n_checked < MIN_AGREE else "unpatterned"


def describe_leaf(leaf: LeafReport, source: str, batch: int | None,
                  noun: str = "gradient", autodiff: str = "jax.grad") -> str:
    """One sentence about a mismatched leaf: its pattern (or its extent) and likely cause."""
    what = f"{_the(source, noun)} of {leaf.path or '<params>'}"
    if leaf.pattern is not None:
        body = _pattern_sentence(leaf, what, batch, noun)
    else:
        extent = _extent(leaf)
        body = _EXTENT_MESSAGES[extent].format(
            what=what, n=leaf.n_mismatch, entries=_entries(leaf.n_mismatch),
            n_checked=leaf.n_checked, checked=leaf.checked, numerical=leaf.numerical)
        if extent == "systematic" and leaf.autodiff_status == Status.OK:
            body += (f", while {autodiff} passes the same test (so the finite differences are "
                     "not biased there)")
    if leaf.directions and leaf.n_mismatch:
        body += (f" (found by {leaf.directions} random-direction tests and group testing, and "
                 "confirmed entry by entry)")
    elif leaf.n_mismatch == 0 and leaf.pattern is not None and not leaf.directions:
        body += " (taken together over the leaf: small, below any single entry's error bar)"
    return body


def worst_lines(leaf: LeafReport, source: str, with_autodiff: bool, k: int = 3,
                autodiff: str = "jax.grad") -> list[str]:
    """The worst entries, one line each; for a leaf wrong only along a random direction, the
    derivatives along it (never entries that agree)."""
    rows = [(f"at {idx}", num, chk, ad) for idx, num, chk, ad in leaf.worst[:k]]
    if not rows and leaf.directions and leaf.numerical is not None:
        rows = [("along the failing direction", leaf.numerical, leaf.checked, leaf.autodiff)]
    out = []
    for where, num, chk, ad in rows:
        line = f"      {where}: numerical {num:.6g}, {source} {chk:.6g}"
        if with_autodiff and ad is not None:
            line += f", {autodiff} {ad:.6g}"
        out.append(line)
    return out




def diagnosis(leaves: list[LeafReport], agrees: dict[str, bool | None], *, source: str,
              has_autodiff: bool, autodiff_why: str | None, batch: int | None,
              eps: float | None = None, autodiff: str = "jax.grad",
              noun: str = "gradient", float64: bool = True,
              method: str = Method.CENTRAL) -> tuple[Verdict, str]:
    """The verdict (diagnose.triage) and the text that explains it.

    `agrees` maps each mismatched leaf's path to whether the checked gradient agrees with
    jax.grad there (None when jax.grad is not a separate opinion). `float64` and `method` say
    what the check already did, so that its advice never repeats it.
    """
    words = _Words(source, noun, autodiff, batch)
    t = triage(leaves, agrees, words.checking_autodiff)
    if t.verdict in (Verdict.OK, Verdict.UNRESOLVED, Verdict.PRECISION):
        lines = words.agreement(leaves)
    else:
        lines = words.mismatches(t, has_autodiff, autodiff_why)
        if t.suspect or t.conflict or words.checking_autodiff:
            kinks = any(leaf.n_kink or leaf.direction_kinks
                        for leaf in (*t.wrong, *t.suspect, *t.conflict))
            lines.append(_numerics_advice(eps, kinks, float64))
    lines += precision_lines([leaf for leaf in leaves if leaf.own_dtype is not None], words)
    rough = [leaf for leaf in leaves
             if leaf.unexplained_excess and leaf.status != Status.MISMATCH]
    if rough:
        lines.append(
            f"Taken together, the residuals of {_paths(rough)} exceed the loss's noise, but in "
            "no systematic pattern (no constant factor, no term proportional to the "
            "parameters): most likely the steps crossed kinks (relu units switching within "
            "h), which biases finite differences, each entry its own way and the whole leaf "
            "by about as much as the step, or jax.grad shows the same excess. It is not "
            "counted as a gradient bug: every entry passed against its own error bar, and a "
            "factor or term of the whole leaf would have to stand out of that scatter and "
            "stay when the bias that grows with the step is removed; the resolution says how "
            "large it must be to do so (x64=True tells for sure).")
    unresolved = [leaf for leaf in leaves if leaf.status == Status.UNRESOLVED]
    if unresolved:
        lines += _unresolved_lines(unresolved, source, noun, autodiff, words.checking_autodiff,
                                   float64, method)
    lines += _coarse_lines(leaves, float64, method)
    for leaf in leaves:
        lines += _kink_lines(leaf)
    return t.verdict, "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Words:
    """Who is speaking about what: the checked source, the noun, jax's own opinion."""

    source: str
    noun: str
    autodiff: str
    batch: int | None

    @property
    def checking_autodiff(self) -> bool:
        return self.source == self.autodiff

    @property
    def the(self) -> str:
        return _the(self.source, self.noun)

    def agreement(self, leaves: list[LeafReport]) -> list[str]:
        """No mismatch: what was verified, and any doubt about jax.grad."""
        lines = []
        unresolved = any(leaf.status == Status.UNRESOLVED for leaf in leaves)
        n = sum(leaf.n_checked for leaf in leaves if leaf.status != Status.UNRESOLVED)
        dirs = sum(leaf.directions for leaf in leaves)
        if dirs:
            n_dir_leaves = sum(1 for leaf in leaves if leaf.directions)
            lines.append(f"{_sentence(self.the)} agrees with finite differences along all "
                         f"{dirs} random directions ({n_dir_leaves} "
                         f"{'leaf' if n_dir_leaves == 1 else 'leaves'})"
                         + (f" and in all {n} entries checked one by one." if n else "."))
        elif n:
            lines.append(f"{_sentence(self.the)} agrees with finite differences in all {n} "
                         "checked entries" + (" of the resolved leaves." if unresolved else "."))
        ad_bad = [leaf for leaf in leaves if leaf.autodiff_status == Status.MISMATCH]
        if ad_bad and not self.checking_autodiff:
            lines.append(f"Note: {self.autodiff} disagrees with finite differences in "
                         f"{_paths(ad_bad)} while {self.the} agrees: if the loss "
                         "uses a jax.custom_vjp or custom_jvp rule, that rule may be wrong.")
        return lines

    def mismatches(self, t, has_autodiff: bool, autodiff_why: str | None) -> list[str]:
        """Who is wrong where, with each leaf's pattern and worst entries."""
        ad, the = self.autodiff, self.the
        lines = []
        if t.wrong:
            if self.checking_autodiff:
                lines.append(
                    f"{ad} disagrees with finite differences in {_paths(t.wrong)}. If the "
                    "function uses a jax.custom_vjp or jax.custom_jvp rule, that rule is the "
                    "likely culprit; otherwise see the advice on numerics below.")
            elif has_autodiff:
                lines.append(
                    f"{_sentence(the)} is wrong in {_paths(t.wrong)}: {ad} agrees "
                    "with finite differences there, so the bug is in the hand-written "
                    f"{self.noun}, not in the function or the numerics.")
            else:
                lines.append(
                    f"{_sentence(the)} disagrees with finite differences in "
                    f"{_paths(t.wrong)}. {ad} cannot break the tie ({autodiff_why}), but the "
                    "differences are outside the finite differences' error bars (and outside "
                    "the one-sided slopes wherever the loss has a kink), so the hand-written "
                    f"{self.noun} is the likely culprit.")
            for leaf in t.wrong:
                lines += self.leaf_lines(leaf, not self.checking_autodiff)
        if t.suspect:
            lines.append(
                f"{_sentence(the)} and {ad} agree with each other but not with finite "
                f"differences in {_paths(t.suspect)}: the numerics are suspect, or the loss is "
                "not differentiable at these parameters.")
            for leaf in t.suspect:
                lines += worst_lines(leaf, self.source, True, autodiff=ad)
        if t.conflict:
            lines.append(
                f"All three disagree in {_paths(t.conflict)}: {the} differs from "
                f"both finite differences and {ad}, and {ad} differs from finite "
                "differences too. A custom_vjp/custom_jvp rule in the loss may be wrong as well "
                "as the hand-written gradient, or the numerics are unreliable here.")
            for leaf in t.conflict:
                lines += self.leaf_lines(leaf, True)
        return lines

    def leaf_lines(self, leaf: LeafReport, with_autodiff: bool) -> list[str]:
        return ([f"  - {describe_leaf(leaf, self.source, self.batch, self.noun, self.autodiff)}."]
                + worst_lines(leaf, self.source, with_autodiff, autodiff=self.autodiff))


def precision_lines(leaves: list[LeafReport], words: _Words) -> list[str]:
    """Leaves whose gradient fails at the precision the model runs in (userprecision.py)."""
    if not leaves:
        return []
    dtype = leaves[0].own_dtype
    the = words.the
    lines = [f"{_sentence(the)} is right in float64 but not in {dtype}, the precision your "
             f"model runs in, in {_paths(leaves)}:"]
    for leaf in leaves:
        index, v64, v_own = leaf.own_worst
        n = leaf.own_n_nonfinite or leaf.own_n_bad
        what = (f"{n} non-finite entr{'y' if n == 1 else 'ies'}" if leaf.own_n_nonfinite else
                f"{n} entr{'y' if n == 1 else 'ies'} off by more than half of {dtype}'s digits")
        also = ""
        if leaf.own_autodiff_too is not None and not words.checking_autodiff:
            also = (f"; {words.autodiff} fails there too, so the loss's own {dtype} computation "
                    "is the cause" if leaf.own_autodiff_too else
                    f"; {words.autodiff} is right there, so the {dtype} computation of "
                    f"{the} is the cause")
        lines.append(f"  - {leaf.path or '<params>'}: {what}, worst at {index}: {v_own:.6g} in "
                     f"{dtype} where float64 gives {v64:.6g}{also}.")
    lines.append(
        f"In {dtype} the gradient overflows, divides by zero or cancels where float64 does not: "
        "typically a branch that jnp.where discards but still differentiates (exp(100) * 0 is "
        f"NaN in the gradient: compute the branch on a safe input, the double-where trick), a "
        "log or sqrt of an underflowed value, or a large sum cancelling. Fix it there, or train "
        "in float64; this check ran in float64, where the gradient is right.")
    return lines


def _numerics_advice(eps: float | None, kinks: bool, float64: bool) -> str:
    """How to rule out the numerics when jax's own derivative disagrees with them. Without a kink
    or tie among the failing entries, moving away from the point is no advice: a rule wrong at a
    special point (log_sigmoid's at 0, a where's boundary) is right everywhere else, and the
    check there is what found it."""
    if eps is not None:
        return (f"The step was fixed by hand (eps={eps:g}): first try eps=None, which picks "
                "each entry's step from its dtype and magnitude.")
    if not kinks:
        return ("Finite differences see a smooth loss at these entries (no kink or tie within "
                "the steps, which were checked at several sizes), so the numerics are unlikely "
                "to be at fault. If the loss uses a custom_jvp or custom_vjp rule, check it at "
                "this very point: rules are most often wrong at special points (zero, a tie, a "
                "branch boundary), and moving away would hide the bug."
                + ("" if float64 else " In float32, x64=True confirms it with more digits."))
    return ("To rule out the numerics: these entries sit at kinks or ties (relu, max, abs, "
            "where, sort at a switch), where derivatives are defined by convention; check at a "
            "point without ties as well (random, non-integer inputs and biases)"
            + ("" if float64 else ", and in float64 (x64=True)")
            + ", or try another step (eps=1e-4 or 1e-7).")


def _coarse_lines(leaves: list[LeafReport], float64: bool, method: str) -> list[str]:
    """Verified leaves whose resolution is coarser than COARSE: bugs that could hide."""
    coarse = [leaf for leaf in leaves if leaf.status in (Status.OK, Status.KINK)
              and leaf.resolution is not None and leaf.resolution > COARSE]
    if not coarse:
        return []
    worst = max(coarse, key=lambda leaf: leaf.resolution)
    return [f"Resolution: the finite differences' error bar (rounding noise, or truncation at "
            f"this step) is large next to the gradient of {_paths(coarse)}, so errors smaller "
            f"than {pct(worst.resolution)} of {worst.path or '<params>'} could go unseen. "
            + _resolution_advice(float64, method)]


def _kink_lines(leaf: LeafReport) -> list[str]:
    """Why entries at kinks and ties passed."""
    lines = []
    n = leaf.n_kink - leaf.n_tie
    if n:
        lines.append(
            f"{n} entr{'y' if n == 1 else 'ies'} of {leaf.path or '<params>'} "
            f"sit{'s' if n == 1 else ''} on a kink (a relu at 0, a max-pool tie, "
            "|x| at 0): the loss is not differentiable there and the one-sided slopes "
            "differ. The checked value lies between them, so that is expected, not a "
            "failure.")
    if leaf.n_tie:
        t = leaf.n_tie
        lines.append(
            f"{t} entr{'y' if t == 1 else 'ies'} of {leaf.path or '<params>'} "
            f"sit{'s' if t == 1 else ''} at a tie: several elements (relu units, "
            "max-pool inputs) are exactly at their kinks along "
            f"{'this coordinate' if t == 1 else 'these coordinates'}, some turning on "
            "to the right and others to the left, so the derivative is undefined and a "
            "convention (jax.grad's relu'(0) = 0, or a mask z >= 0) can lie outside both "
            "one-sided slopes. Not a failure; to verify these entries, check at a point "
            "without ties (random, non-integer inputs and biases).")
    return lines


def _resolution_advice(float64: bool, method: str) -> str:
    """How to resolve more, never repeating what the check already did."""
    steps = []
    if not float64:
        steps.append("check in float64 (x64=True)")
    if method != Method.RICHARDSON:
        steps.append("use method='richardson' (one more digit, 3x the cost)")
    steps.append("make the gradient larger next to the loss (a loss dominated by a large "
                 "constant, such as 1 + small terms, keeps only the constant's digits)")
    return "To resolve them: " + "; or ".join(steps) + "."


def _unresolved_lines(unresolved, source, noun, autodiff, checking_autodiff, float64, method):
    the = _the(source, noun)
    lines = []
    kinky = [leaf for leaf in unresolved if leaf.limited_by == "kinks"]
    if kinky:
        n = sum(leaf.n_rough for leaf in kinky)
        probes = "random directions" if all(leaf.directions for leaf in kinky) else "entries"
        lines.append(
            f"Unresolved: {_paths(kinky)}: finite differences disagree with {the} at {n} "
            f"{probes}, few next to the kinks found there. Steps that cross kinks also miss some "
            "(a kink at 2h/3 from x hides from the kink test and biases the difference "
            "quotient; many units switching together, as in a recurrent network, look like "
            f"curvature), so these disagreements are not evidence against {the}, and they are "
            "not verified either: the check is not ok. Check in float64 (x64=True), where the "
            "step is too small to cross them, to decide.")
    unresolved = [leaf for leaf in unresolved if leaf.limited_by != "kinks"]
    if not unresolved:
        return lines
    causes = {leaf.limited_by for leaf in unresolved}
    cause = {"rounding": "the loss's rounding noise is as large as the change a step makes "
                         "(a gradient tiny next to the loss's own size)",
             "truncation": "the difference quotients change with the step, since the loss "
                           "varies on a scale finer than any step that its rounding allows (an "
                           "oscillation faster than the step, or a forward computed to only a "
                           "few digits, as a special function at the edge of its range)"}
    why = "; or ".join(cause[c] for c in ("truncation", "rounding") if c in causes) or \
        cause["rounding"]
    lines.append(
        f"Unresolved: finite differences cannot resolve the {noun} of {_paths(unresolved)}: "
        f"{why}. The error bar is at least as large as the {noun} itself, so {the} could be 2× too "
        "large, of the wrong sign, or zero there without any test failing. Nothing was "
        "verified in these leaves, so the check is not ok. " + _resolution_advice(float64, method))
    if checking_autodiff or all(leaf.autodiff is None for leaf in unresolved):
        return lines
    split = [leaf for leaf in unresolved if leaf.autodiff_disagrees]
    same = [leaf for leaf in unresolved if not leaf.autodiff_disagrees]
    if split:
        lines.append(
            f"{_sentence(the)} and {autodiff} disagree in {_paths(split)}, beyond their "
            "rounding: one of them is wrong there, but finite differences cannot tell which.")
        for leaf in split:
            lines += worst_lines(leaf, source, True, autodiff=autodiff)
    if same:
        lines.append(f"{_sentence(the)} and {autodiff} agree with each other to rounding in "
                     f"{_paths(same)}, which finite differences cannot confirm.")
    return lines


def _paths(leaves: list[LeafReport]) -> str:
    return ", ".join(leaf.path or "<params>" for leaf in leaves)


def _the(source: str, noun: str = "gradient") -> str:
    """'the hand-written gradient' or 'jax.grad' (which is not 'the jax.grad gradient')."""
    return source if source.startswith("jax") else f"the {source} {noun}"


def _sentence(text: str) -> str:
    """Capitalises a sentence start, except a code name such as jax.grad."""
    return text if text.startswith("jax") else text[:1].upper() + text[1:]



