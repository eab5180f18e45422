"""jgc's vocabularies: statuses, verdicts, patterns, modes, methods and evaluators.

Each is a str-valued Enum whose members carry their own words (the label the text and HTML views
print, the help the command line shows) and colour, as lineax keeps its outcomes. A member is
equal to its plain string ("ok" == Status.OK), prints, formats and reprs as it, and serialises to
it in JSON, so reports keep the strings the public API promises. An entry's status (`Entry`) is an
IntEnum instead, so that a leaf's statuses are one integer numpy array.
"""

from __future__ import annotations

import enum


class _Vocab(str, enum.Enum):
    """A str Enum that prints, formats and serialises as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:  # a Report's repr shows verdict='ok', as the API documents
        return repr(self.value)

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value, name: str, advice: str = ""):
        """The member for a user's string, or InputError naming the choices."""
        from jgc._src.stages.split import InputError

        try:
            return cls(value)
        except ValueError:
            raise InputError(f"{name}={value!r} is not one of {cls.choices()}. {advice}".rstrip()
                             ) from None


class Status(_Vocab):
    """A leaf's status (an entry's is an `Entry`)."""

    OK = "ok"
    KINK = "kink"
    MISMATCH = "mismatch"
    UNRESOLVED = "unresolved"
    SKIPPED = "skipped"
    PRECISION = "precision"  # right in float64, wrong at the user's own precision

    @property
    def verified(self) -> bool:
        """ok and kink are verified; mismatch, unresolved and precision are not; skipped is not
        checked."""
        return self in (Status.OK, Status.KINK, Status.SKIPPED)

    @property
    def label(self) -> str:
        return self.value if self.verified else self.value.upper()

    @property
    def colour(self) -> str:
        return _STATUS_COLOURS[self]

    @property
    def cell(self) -> str:
        """The status cell of the text and HTML tables, as a `str.format` template that
        text.leaf_status fills in, where no entry mismatches (otherwise the cell counts them):
        `{label}`, and the fields each status names (`{kinks}` is " (3 at kinks)" or "")."""
        return _STATUS_CELLS[self]


_STATUS_CELLS = {
    Status.OK: "{label}{kinks}",
    Status.KINK: "{label}{kinks}",
    Status.MISMATCH: "{label} (as a whole)",
    Status.UNRESOLVED: "{label} (resolution {resolution})",
    Status.SKIPPED: "skipped ({reason})",
    # own_n_bad counts over the whole leaf (its gradient is compared at every entry), so out of
    # its size, not out of the entries finite differences checked (a sample: 38/16 read wrong).
    Status.PRECISION: "{label} (in {own_dtype}: {own_n_bad}/{size})",
}
_STATUS_COLOURS = {Status.OK: "#1a7f37", Status.KINK: "#9a6700", Status.MISMATCH: "#cf222e",
                   Status.UNRESOLVED: "#9a6700", Status.SKIPPED: "#6e7781",
                   Status.PRECISION: "#cf222e"}


class Entry(enum.IntEnum):
    """One probe's comparison (an entry, a direction, an output along a tangent): estimate.compare.

    TIE: a kink where the checked value lies outside the one-sided slopes, as a tie convention
    can when several elements sit at their kinks at once. A leaf with a MISMATCH entry is a
    mismatch; with KINK or TIE entries (and none wrong) it is a kink.
    """

    OK = 0
    KINK = 1
    MISMATCH = 2
    TIE = 3
    ROUGH = 4  # finite differences disagree across step scales: the loss is not smooth there


class Verdict(_Vocab):
    OK = "ok"
    WRONG_GRADIENT = "wrong_gradient"
    SUSPECT_NUMERICS = "suspect_numerics"
    DISAGREEMENT = "disagreement"
    RANDOMNESS = "randomness"
    UNRESOLVED = "unresolved"
    PRECISION = "precision"  # right in float64, wrong at the precision the model runs in

    @property
    def headline(self) -> str:
        """The report's first word: OK, MISMATCH, SUSPECT NUMERICS, RANDOM LOSS, UNRESOLVED."""
        return _HEADLINES[self]

    @property
    def colour(self) -> str:
        return {Verdict.OK: "#1a7f37", Verdict.WRONG_GRADIENT: "#cf222e",
                Verdict.DISAGREEMENT: "#cf222e", Verdict.PRECISION: "#cf222e"}.get(self, "#9a6700")


_HEADLINES = {Verdict.OK: "OK", Verdict.WRONG_GRADIENT: "MISMATCH",
              Verdict.SUSPECT_NUMERICS: "SUSPECT NUMERICS", Verdict.DISAGREEMENT: "MISMATCH",
              Verdict.RANDOMNESS: "RANDOM LOSS", Verdict.UNRESOLVED: "UNRESOLVED",
              Verdict.PRECISION: "WRONG AT YOUR PRECISION"}


class Pattern(_Vocab):
    """One-parameter models of the classic bugs (diagnose.find_pattern)."""

    SCALE = "scale"
    SIGN = "sign"
    TRANSPOSE = "transpose"
    REGULARIZATION = "regularization"
    ZERO = "zero"
    NONFINITE = "nonfinite"
    CONJUGATE = "conjugate"

    def message(self, variant: str = "") -> str:
        """The sentence naming this pattern in a mismatched leaf and its likely cause, as a
        `str.format` template: `{what}` is "the hand-written gradient of ['W1']"; a scale has
        `{factor}` (explain.describe_factor's words), a regularisation `{lam}`, non-finite
        entries `{n}`, `{entries}` and `{first}`. `variant`: a regularisation term that is
        "missing" or "extra"; a conjugate "gradient" or the other nouns' ("")."""
        return _PATTERN_MESSAGES[self, variant]


_PATTERN_MESSAGES = {
    (Pattern.SCALE, ""): "{what} {factor}",
    (Pattern.SIGN, ""): (
        "{what} has the wrong sign (factor -1): likely a subtraction reversed (y - p instead of "
        "p - y) or an ascent direction"),
    (Pattern.TRANSPOSE, ""): (
        "{what} is the transpose of the right gradient: likely X @ dZ.T where X.T @ dZ was "
        "meant, or a weight used as W.T in the forward pass"),
    (Pattern.REGULARIZATION, "missing"): (
        "{what} is missing a term proportional to the parameters: the regularisation gradient "
        "λ·θ is missing, λ ≈ {lam:.3g}"),
    (Pattern.REGULARIZATION, "extra"): (
        "{what} has an extra term proportional to the parameters, λ ≈ {lam:.3g}: regularisation "
        "counted twice (λ·θ with a loss of ½λθ² gives λ·θ, not 2λ·θ), or applied to a parameter "
        "the loss does not regularise"),
    (Pattern.CONJUGATE, ""): (
        "{what} is the complex conjugate of the right one: likely one conj() too many or too "
        "few (the derivative of conj(z) taken as that of z, or the reverse)"),
    (Pattern.CONJUGATE, "gradient"): (
        "{what} is the complex conjugate of the right one: it is written in the ∂f/∂x + i·∂f/∂y "
        "convention (as PyTorch's .grad holds it), or has one conj() too many or too few, where "
        "JAX's convention is ∂f/∂x − i·∂f/∂y (jax.grad of a real loss returns it); conjugate it "
        "(jnp.conj)"),
    (Pattern.ZERO, ""): "{what} is all zeros: it was never computed, or was overwritten",
    (Pattern.NONFINITE, ""): (
        "{what} has {n} non-finite {entries} (NaN or Inf){first} where finite differences give "
        "a finite derivative: a division by zero, a log or sqrt at 0, or an overflow (exp of a "
        "large number) in the computation"),
}


class Mode(_Vocab):
    AUTO = "auto"
    FULL = "full"
    SAMPLE = "sample"
    DIRECTIONAL = "directional"

    @property
    def help(self) -> str:
        return _MODE_HELP[self]


_MODE_HELP = {
    Mode.AUTO: "a full check when it is predicted to be cheap, else directional plus a sample",
    Mode.FULL: "every entry",
    Mode.SAMPLE: "a seeded sample of entries per leaf (a quarter of them the largest)",
    Mode.DIRECTIONAL: "random directions per leaf, group testing to find wrong entries",
}
MODE_ADVICE = ("Use mode='full' to check every entry, mode='sample' for a seeded sample of each "
               "leaf, or mode='directional' for random directions per leaf (large models).")


class Method(_Vocab):
    CENTRAL = "central"
    RICHARDSON = "richardson"
    COMPLEX = "complex"

    @property
    def step_power(self) -> float:
        """The step is unit**power (plan.py): central differences balance rounding u/h against
        truncation h**2 at h ~ u**(1/3); Richardson's R = (4 D(h) - D(2h)) / 3 has truncation
        h**4, balanced at u**(1/5). The complex step Im f(x + i h) / h has no subtractive
        cancellation: its truncation, h**2 |f'''| / 6, vanishes for h ~ u (power 1)."""
        return {Method.CENTRAL: 1 / 3, Method.RICHARDSON: 1 / 5, Method.COMPLEX: 1.0}[self]

    @property
    def help(self) -> str:
        return _METHOD_HELP[self]


_METHOD_HELP = {
    Method.CENTRAL: "central differences: 2 loss evaluations per entry",
    Method.RICHARDSON: "Richardson extrapolation from h, 2h, 4h: 6 per entry, about one more "
                       "digit (worth it in float32)",
    Method.COMPLEX: "the complex step, for complex-analytic losses: 1 complex evaluation per "
                    "entry, exact to rounding",
}
METHOD_ADVICE = ("'central' (default) costs 2 loss evaluations per entry; 'richardson' costs 6 "
                 "and gives more digits, which matters most in float32; 'complex' (the complex "
                 "step, for complex-analytic losses) costs 1 complex evaluation and is exact to "
                 "rounding.")


class EvaluatorChoice(_Vocab):
    """The `evaluator` option: which strategy evaluates a traceable loss's perturbations."""

    AUTO = "auto"
    DENSE = "dense"


EVALUATOR_ADVICE = ("'auto' (default) takes the structured pass (only what a perturbation "
                    "changes is recomputed) for float64 losses of at least 20,000 parameters, "
                    "leaf by leaf where it does less work; 'dense' evaluates the whole loss for "
                    "every perturbation.")
