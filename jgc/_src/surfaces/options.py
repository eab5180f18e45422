"""A check's options: only what the user sets, validated once (`make_options`).

Every bad value is an InputError naming the option and the values it accepts. What the surfaces
know about a check beyond the user's settings travels on the carrier (stages/prepare.py).
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from jgc._src.report.vocab import (
    EVALUATOR_ADVICE,
    METHOD_ADVICE,
    MODE_ADVICE,
    EvaluatorChoice,
    Method,
    Mode,
)
from jgc._src.stages.split import InputError


@dataclasses.dataclass(frozen=True)
class Options:
    """A check's options, as the user set them, validated once (see check_grad for their
    meaning)."""

    x64: bool = True
    mode: Mode = Mode.AUTO
    method: Method = Method.CENTRAL
    eps: float | None = None
    rtol: float | None = None
    atol: float | None = None
    samples: int = 16
    seed: int = 0
    memory_budget: int | None = None
    progress: bool | None = None
    has_aux: bool = False
    evaluator: EvaluatorChoice = EvaluatorChoice.AUTO

    @property
    def user_tolerance(self) -> bool:
        """The user fixed the tolerance (rtol/atol): what passes is theirs to choose."""
        return self.rtol is not None or self.atol is not None

    @property
    def refine(self) -> bool:
        """Finer steps where a gradient is in doubt, unless the user fixed the step or the
        tolerance: their choice stands."""
        return self.eps is None and not self.user_tolerance


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def make_options(**kw) -> Options:
    """Options from the user's keywords, with an InputError naming any bad one."""
    mode = Mode.parse(kw.pop("mode", "auto"), "mode", MODE_ADVICE)
    method = Method.parse(kw.pop("method", "central"), "method", METHOD_ADVICE)
    evaluator = EvaluatorChoice.parse(kw.pop("evaluator", "auto"), "evaluator",
                                      EVALUATOR_ADVICE)
    opts = Options(mode=mode, method=method, evaluator=evaluator, **kw)
    for name in ("rtol", "atol"):
        v = getattr(opts, name)
        if v is not None and not (_is_number(v) and np.isfinite(v) and v >= 0):
            raise InputError(f"{name}={v!r}: expected a non-negative number, or None to use the "
                             "error model.")
    if opts.eps is not None and not (_is_number(opts.eps) and np.isfinite(opts.eps)
                                     and opts.eps > 0):
        raise InputError(f"eps={opts.eps!r}: the step must be a positive finite number, or None "
                         "to choose it from each leaf's dtype and magnitude.")
    budget = opts.memory_budget
    if budget is not None and not (_is_number(budget) and np.isfinite(budget) and budget >= 1):
        raise InputError(f"memory_budget={budget!r}: expected a positive number of bytes for one "
                         "batch of perturbed evaluations (e.g. 2**30 for 1 GiB), or None for the "
                         "default (a quarter of the available memory, 256 MiB to 1 GiB).")
    if not (_is_int(opts.seed) and opts.seed >= 0):
        raise InputError(f"seed={opts.seed!r}: expected a non-negative integer (it seeds the "
                         "sampled entries and the random directions; default 0).")
    samples = opts.samples
    if not (_is_int(samples) and samples >= 1):
        raise InputError(f"samples={samples!r}: mode='sample' checks `samples` entries per leaf "
                         "(and mode='auto' as many when it falls back to directions), so it must "
                         "be a positive integer (default 16). A check of zero entries would "
                         "verify nothing.")
    for name in ("has_aux", "x64"):
        if not isinstance(getattr(opts, name), bool):
            raise InputError(f"{name}={getattr(opts, name)!r}: expected True or False.")
    if opts.progress is not None and not isinstance(opts.progress, bool):
        raise InputError(f"progress={opts.progress!r}: expected True, False or None (a bar on "
                         "a terminal or in a notebook, for checks over 2 s).")
    return opts


def count_option(name: str, value, mode: Mode, what: str) -> int:
    """A number of random directions (check_jvp's n_tangents, check_hvp's n_directions): a
    non-negative integer, positive where the mode draws nothing else."""
    if not (_is_int(value) and value >= 0):
        raise InputError(f"{name}={value!r}: expected a non-negative integer, the number of "
                         f"seeded random {what} (default 2).")
    if value == 0 and mode == Mode.DIRECTIONAL:
        raise InputError(f"{name}=0 with mode='directional': that mode checks random {what} "
                         f"only, so it would check none. Pass {name} >= 1, or mode='full' for "
                         "every basis direction.")
    return int(value)
