"""mode="auto": predicting a full check's time from the programs it runs, and giving up early.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jgc._src.evaluators import programs


class TooSlow(Exception):
    """A full check would take too long (mode="auto"): `predicted` seconds, `per_eval` seconds
    per evaluation on average."""

    def __init__(self, predicted: float, directional: float, per_eval: float):
        super().__init__(f"predicted {predicted:.1f} s")
        self.predicted, self.directional, self.per_eval = predicted, directional, per_eval


@dataclasses.dataclass
class Deadline:
    """mode="auto": predicts a full check's time from the measured throughput of the programs
    it actually runs (after compilation), while its first stencil runs, largest leaves first.

    Each leaf's evaluations are registered with the work one of them does (`expect`; the
    structured evaluator's per-leaf estimate, or the same for every leaf on the dense path).
    After each chunk the prediction is: factor x (execution so far + the evaluations still to
    do x their work x the highest seconds per unit of work of any program so far) +
    compilation so far + the leaf programs still to compile at the mean compile time so far.
    A program's rate is its mean over its chunks, leaving out its first chunk once there are
    others: a program's first run also pays for its buffers and threads (5x the rest on the
    MNIST CNN). `factor` scales the first stencil to the whole check (2h everywhere in reduced
    precision, Richardson's 4h). TooSlow is raised when the prediction exceeds both `seconds`
    and what directional mode would cost (per leaf: a compile and about DIRECTIONAL_EVALS
    evaluations): a full check that is cheaper than the alternative is always run.
    """

    seconds: float
    factor: float
    n_leaves: int
    total: int = 0  # evaluations of the first stencil
    done: int = 0
    execution: float = 0.0
    compiling: float = 0.0
    compiled: int = 0  # programs compiled so far in this pass
    groups_left: int = 0
    rate: float = 0.0  # the highest seconds per evaluation of any program so far
    unit_rate: float = 0.0  # the highest seconds per unit of work of any program so far
    pending: dict = dataclasses.field(default_factory=dict)  # leaf -> [evaluations left, work]
    current: Any = None
    chunks: list = dataclasses.field(default_factory=list)  # the current program's (n, s)
    finished: tuple = (0.0, 0.0)  # (rate, unit_rate) before the current program

    def expect(self, leaf, evaluations: int, work: float) -> None:
        """`evaluations` of `leaf` are to come, each doing `work` (any consistent unit)."""
        self.total += evaluations
        self.pending[leaf] = [evaluations, max(work, 1e-30)]

    def next_program(self, leaf) -> None:
        """The chunks that follow are `leaf`'s, run by another program."""
        self.finished, self.chunks, self.current = (self.rate, self.unit_rate), [], leaf

    def observe(self, evals: int, padded: int, seconds: float) -> None:
        """A chunk of `evals` evaluations (`padded` with the padding) ran in `seconds`."""
        self.done += evals
        self.execution += seconds
        self.chunks.append((max(padded, 1), seconds))
        steady = self.chunks[1:] or self.chunks
        rate = sum(t for _, t in steady) / sum(n for n, _ in steady)
        left = self.pending.setdefault(self.current, [0, 1.0])
        left[0] = max(0, left[0] - evals)
        self.rate = max(self.finished[0], rate)
        self.unit_rate = max(self.finished[1], rate / left[1])
        to_do = sum(n * w for n, w in self.pending.values()) * self.unit_rate
        mean_compile = self.compiling / max(self.compiled, 1)
        predicted = (self.factor * (self.execution + to_do) + self.compiling
                     + self.groups_left * mean_compile)
        directional = self.n_leaves * (mean_compile + DIRECTIONAL_EVALS * self.rate)
        # A program's first chunk alone does not decide, unless it was already slow: the
        # second is cheap next to the budget and gives the steady rate.
        first = len(self.chunks) == 1 and seconds < self.seconds / 4
        per_eval = (self.execution + to_do) / max(self.total, 1)
        slow = predicted > max(self.seconds, directional) and not first
        # One decision for every process (jax.distributed): process 0's, as timings differ.
        slow, predicted, directional, per_eval = programs.from_process_0(
            [slow, predicted, directional, per_eval])
        if slow:
            raise TooSlow(predicted, directional, per_eval)


# Evaluations directional mode spends per leaf: 2 directions x (4 + up to 8 refining) and the
# noise probes, plus a sample of 16 entries x 2 to 4 (auto mode's sample).
DIRECTIONAL_EVALS = 60
