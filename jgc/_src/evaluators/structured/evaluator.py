"""The structured strategy: the dense evaluator, except that one-entry perturbations of a leaf go
through the structured pass (evaluators/structured/), which recomputes only what each changes.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.evaluators import programs
from jgc._src.evaluators.builders import INDEX_DTYPE, _displaced, _map, _Static
from jgc._src.evaluators.calls import first_line, forbidden_promotion
from jgc._src.evaluators.dense import (
    PER_LEAF_MIN,
    DenseEvaluator,
    _LeafProgram,
    _SlowerThanDense,
    _Unbatchable,
)
from jgc._src.evaluators.structured.flatjaxpr import base_values, flatten
from jgc._src.evaluators.structured.leafplan import (
    LeafPlan,
    cancellation,
    describe,
    leaf_losses,
    leaf_losses_dense,
    plan_leaf,
)
from jgc._src.stages.split import InputError

# The structured evaluator (structured/) for losses with at least this many parameters: below,
# one dense program over the flat vector costs less than compiling a program per leaf.
STRUCTURED_MIN = PER_LEAF_MIN


class StructuredEvaluator(DenseEvaluator):
    """The dense evaluator, except that a leaf's one-entry perturbations go through the
    structured pass (structured/) wherever it does less work: only what each perturbation
    changes is recomputed, and directions in it start from the pass's base values (the
    upstream layers once per check). The complex step stays dense."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.per_leaf = True
        self.flat = None
        self.plans: dict[int, LeafPlan] = {}
        self.bases: dict[int, Any] = {}
        self.failed: dict[int, str] = {}
        self.forward_seconds = math.inf  # one plain forward pass: the base values' program

    def _setup(self) -> None:
        """Plans every leaf (abstract traces, no compilation), then computes the base values
        the structured leaves read, in one forward pass shared by all of them."""
        self.flat = flat = flatten(self.traced.closed)
        for k, (a, b, _) in enumerate(self.segments):
            leaf = jax.ShapeDtypeStruct((b - a,), self.dtype)
            try:
                self.plans[k] = plan_leaf(flat, flat.invars[k], flat.avals, leaf,
                                                     self.dtypes[k])
            except Exception as e:  # noqa: BLE001 - a rule that cannot trace: dense
                if forbidden_promotion(e):  # jgc's own code promoting implicitly: a bug, which
                    raise  # a fallback would hide under the user's strict promotion settings
                self.failed[k] = f"failed: {first_line(e)}"
        needed = {i for p in self.plans.values() if p.use for i in p.needed}
        if not needed:
            return
        # The loss itself too: f0 (`at`) then needs no program of its own.
        needed = tuple(sorted(needed | {o for o in flat.outs if isinstance(o, int)}))
        static = ("structured_base", self.segments, needed)
        program = programs.compiled(
            "structured_base", lambda: _program_base(flat, self.segments, needed), static,
            (self.traced,), (self.consts, self.theta, self.dyn), work=self.work)
        started = time.perf_counter()
        values = jax.block_until_ready(program(self.consts, self.theta, self.dyn))
        self.forward_seconds = time.perf_counter() - started
        self.bases = dict(zip(needed, values))
        for k, plan in self.plans.items():
            why = cancellation(plan, self.bases) if plan.use else None
            if why:
                self.failed[k] = f"was not used: {why}"

    def at(self):
        """f0 from the base values' forward pass, which computes the loss anyway (the dense
        evaluator's `at` would compile a direction program for it)."""
        if self.flat is None:
            self._setup()
        (out,) = self.flat.outs if len(self.flat.outs) == 1 else (None,)
        if not isinstance(out, int) or out not in self.bases:
            return super().at()
        return float(programs.to_host(self.bases[out]))

    def leaf_work(self, k: int) -> float:
        """The plan's estimate: the structured work, or the whole function's for a dense leaf."""
        if self.flat is None:
            self._setup()
        plan = self.plans.get(k)
        if plan is None or k in self.failed:
            return max((p.dense for p in self.plans.values()), default=1.0)
        return plan.structured if plan.use else plan.dense

    def eval_work(self, kind: str, leaf: int | None) -> float:
        """The structured program's planned work; every other program (directions, the
        complex step, dense leaves) evaluates the whole function."""
        plan = None if leaf is None else self.plans.get(leaf)
        if kind != "structured" or plan is None:
            return self.work
        return plan.structured

    def leaf_program(self, k: int) -> _LeafProgram:
        """The structured program where leaf k has a plan that pays, else the dense one."""
        if self.flat is None:
            self._setup()
        plan = self.plans.get(k)
        if plan is None or not plan.use or k in self.failed:
            return super().leaf_program(k)
        bases = tuple(self.bases[i] for i in plan.needed)
        # Memory per perturbation: its planned work in elements (an upper bound on what it
        # holds: a contraction's work counts its multiply-adds), held about 4 times over (a
        # slab's values, its change, an operand gathered for it, the rule's output), and every
        # value the pass materialises in full for an operation without a rule (a gather from
        # an embedding table makes the table dense, per perturbation), held twice (the value
        # and the primitive's output of its size). A loop's steps run one after the other:
        # one step's work counts (the stacked outputs are in `materialized`).
        per_bytes = int((4 * max(plan.structured - plan.repeated, 1) + 2 * plan.materialized)
                        * self.dtype.itemsize)
        return _LeafProgram("structured", lambda traced, st: _program_structured(
            self.flat, plan, self.segments, k, self.dtypes[k]), (bases,), per_bytes, False,
            copies_leaf=False)

    def leaf_perturbed(self, k: int, index, step, deadline=None) -> np.ndarray:
        lp = self.leaf_program(k)
        if lp.kind != "structured":
            return super().leaf_perturbed(k, index, step, deadline)
        try:
            return self._batches(lp.kind, lp.build, k, self._batched(k, lp), lp.extra, index,
                                 step, deadline=deadline, per_bytes=lp.per_bytes,
                                 fallback=lp.fallback, first=self._guard(k))
        except InputError:
            raise
        except (_Unbatchable, _SlowerThanDense) as e:  # the dense program, and a note
            self.failed[k] = (f"failed: {first_line(e.__cause__)}"
                              if isinstance(e, _Unbatchable) else f"was abandoned: {e}")
            self.n_evaluations -= len(index)  # counted again by the dense program
            return super().leaf_perturbed(k, index, step, deadline)

    def _guard(self, k: int):
        """After the first chunk of leaf k's structured program: abandon it (`_SlowerThanDense`)
        when it took longer per perturbation than one plain forward pass, what a dense
        evaluation costs at least. The plan weighs counted work, which an operation slow on
        this backend can belie; so the structured pass is never slower than the dense one by
        more than that one chunk (and its compilation)."""
        def check(seconds: float, chunk: int) -> None:
            if seconds / chunk > self.forward_seconds:
                raise _SlowerThanDense(
                    f"it ran {seconds / chunk * 1e3:.3g} ms per perturbation, more than a "
                    f"whole forward pass ({self.forward_seconds * 1e3:.3g} ms)")
        return check

    def along(self, k, vectors, vid, mult, lo, hi) -> np.ndarray:
        """Directions in leaf k from the structured pass's base values where the leaf has a
        plan: the upstream layers are computed once per check, not once per call (group
        testing makes a hundred small calls on a large leaf)."""
        if self.flat is None:
            self._setup()
        plan = None if k is None else self.plans.get(k)
        if plan is None or not plan.use or k in self.failed:
            return super().along(k, vectors, vid, mult, lo, hi)
        bases = tuple(self.bases[i] for i in plan.needed)
        vid, lo, hi = (np.asarray(x, np.int64) for x in (vid, lo, hi))
        mult = np.asarray(mult, np.float64)
        try:
            return self._batches(
                "structured_along", lambda traced, st: _program_structured_along(
                    self.flat, plan, self.segments, k, self.dtypes[k], st), k,
                self.leaf_size(k), (bases, vectors), vid, mult, lo, hi, fallback=False)
        except InputError:
            raise
        except _Unbatchable as e:  # a rule this loss defeats: the dense program, and a note
            self.failed[k] = f"failed: {first_line(e.__cause__)}"
            self.n_evaluations -= len(vid)  # counted again by the dense program
            return super().along(k, vectors, vid, mult, lo, hi)

    def strategy_note(self) -> str:
        specs = self.sp.checked_specs()
        plans = {specs[k].path or "<params>": p for k, p in self.plans.items()
                 if k not in self.failed}
        text = describe(plans) if plans else ""
        if self.failed:
            names = [specs[k].path or "<params>" for k in self.failed]
            text += ("; " if text else "") + (
                f"dense evaluation for {', '.join(names[:4])} (the structured pass "
                f"{next(iter(self.failed.values()))})")
        return text


def _program_base(flat, segments, needed):
    def run(consts, theta, dynamic):
        parts = [theta[a:b].astype(dt) for a, b, dt in segments]
        return base_values(flat, (*parts, *dynamic), consts, needed)

    return run


def _program_structured(flat, plan, segments, k: int, dtype):
    a, b, _ = segments[k]

    def run(consts, theta, dynamic, bases, index, step):
        del consts, dynamic  # everything the pass reads is in `bases`
        leaf = theta[a:b]

        def per_device(i, s):
            out = leaf_losses(flat, list(plan.eqns), flat.invars[k], plan.needed,
                                         bases, leaf, i, s, dtype)
            return out[:, 0]

        return jax.vmap(per_device)(index, step)

    return run


def _program_structured_along(flat, plan, segments, k: int, dtype, st: _Static):
    """As _program_losses_along for leaf k, from the leaf-independent base values: only the
    equations that depend on the leaf run per direction (the layers upstream of it once per
    check, not once per call)."""
    a, b, _ = segments[k]

    def run(consts, theta, dynamic, bases, vectors, vid, mult, lo, hi):
        del consts, dynamic  # everything the pass reads is in `bases`
        leaf = theta[a:b]
        positions = jnp.arange(b - a, dtype=INDEX_DTYPE)

        def one(v, c, lo_, hi_):
            value = _displaced(leaf, positions, vectors, v, c, lo_, hi_).astype(dtype)
            return leaf_losses_dense(flat, list(plan.eqns), flat.invars[k],
                                                plan.needed, bases, value[None])[0, 0]

        return _map(one, (vid, mult, lo, hi), st.sequential, st.batched)

    return run
