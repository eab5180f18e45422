"""mode="directional": random directions per leaf, then group testing to find wrong entries.

A full check costs two loss evaluations per parameter. Directional mode costs a few per leaf.
A direction is a probe like any entry, judged by the same stencil schedule and error model
(estimate.derivative): for a random sign vector v over a leaf, scaled per entry like the
coordinate step (v_i = ±h max(1, |x_i|)), the loss along it, phi(t) = f(x + t v), is differenced
at t = ±1 and ±2, and where a gradient disagrees also at ±1/4 and ±1/8. The checked value is the
directional derivative g . v. So kinks crossed along the direction (a relu unit switching within
the stencil, which in a large network is likely) are recognised exactly as for single entries:
by the jump between the one-sided slopes, a finer step that clears them, or the slopes' range.

The steps are exact in the leaf's dtype (the device adds mult * v with mult a power of two), but
the displacement fl(x + s v) - x is not exactly s times the one at s = 1; each stencil is
therefore shifted by how much the checked change g . displacement / s differs from g . v, so that
every stencil compares with one checked value (estimate.with_stencil).

Group testing. When a direction fails (a mismatch outside every kink allowance, or one that only
a finer, noisier stencil excuses), its entries are split in halves and each half is tested the
same way; failing halves are split again, down to GROUP_LEAF entries, which are checked one by
one with the coordinate error model. A direction alone makes a leaf a mismatch only when it
fails outright. Finding one
wrong entry among n costs about 8 log2(n / GROUP_LEAF) + 4 GROUP_LEAF evaluations instead of 2n.

Directions are seeded by (seed, crc32(path), j): adding a leaf changes no other leaf's.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from jgc._src.report.vocab import Method, Pattern, Status
from jgc._src.stages import differences as dq
from jgc._src.stages import errormodel as em
from jgc._src.stages import estimate as es
from jgc._src.stages import plan as pl
from jgc._src.stages.diagnose import COARSE, UNRESOLVED
from jgc._src.stages.patterns import find_pattern
from jgc._src.stages.perturbations import Directions

N_DIRECTIONS = 2
GROUP_LEAF = 8  # entries checked one by one at the bottom of group testing
MAX_FOUND = 8  # stop localising after this many wrong ranges in one leaf


def direction(seed: int, path: str, j: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(path.encode()), j])
    return rng.choice(np.array([-1.0, 1.0]), size=size)


@dataclasses.dataclass(frozen=True)
class DirectionResult:
    """Directional tests of one leaf: per direction, the values and the status."""

    numerical: np.ndarray  # the directional derivative along v (per unit of t), measured
    checked: np.ndarray  # g . v
    autodiff: np.ndarray | None  # jax.grad . v
    status: np.ndarray  # dq.OK / KINK / TIE / MISMATCH
    autodiff_status: np.ndarray | None
    # MISMATCH also where only a finer stencil's support passed the checked value (see
    # estimate.compare): group testing descends on this, so that anything suspicious is
    # localised and its entries judged one by one; the verdict uses `status`.
    strict: np.ndarray
    tol: np.ndarray  # the allowed |checked - numerical|
    accept: np.ndarray  # how far a value may lie and still pass (see estimate.acceptance)
    norm: np.ndarray  # ||v||: divides the above into derivatives along unit vectors
    kink: np.ndarray | None = None  # bool: the loss has a kink along the direction

    def take(self, sl: slice) -> DirectionResult:
        """The tests of the probes in `sl` (one leaf's, of several tested together)."""
        return DirectionResult(*(None if (a := getattr(self, f.name)) is None else a[sl]
                                 for f in dataclasses.fields(self)))


@dataclasses.dataclass
class LeafOutcome:
    """What directional mode found in one leaf."""

    tests: DirectionResult | None
    candidates: np.ndarray  # local entry indices checked one by one after group testing
    kinks: int = 0  # group tests (parts of a failing direction) found at kinks

    @property
    def resolution(self) -> float:
        """The smallest relative error the directions resolve (acceptance width over the
        measured directional derivative, at the best direction)."""
        if self.tests is None:
            return np.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.tests.accept / np.abs(self.tests.numerical)
        return float(np.nanmin(r)) if np.isfinite(r).any() else np.inf

    @property
    def n(self) -> int:
        return 0 if self.tests is None else len(self.tests.status)

    @property
    def failed(self) -> np.ndarray:
        return np.zeros(0, bool) if self.tests is None else self.tests.status == dq.MISMATCH

    @property
    def ok(self) -> bool:
        return not self.failed.any()

    @property
    def autodiff_ok(self) -> bool | None:
        if self.tests is None or self.tests.autodiff_status is None:
            return None
        return not bool(np.any(self.tests.autodiff_status == dq.MISMATCH))


class Directional:
    """Runs directional tests and group testing on one check's evaluator."""

    def __init__(self, ev, sp, plan: pl.Plan, f0: float, sigma: float | None, u: float,
                 float64: bool, f_scale: float, seed: int, schedule: es.Schedule,
                 checked_is_autodiff: bool = False):
        self.ev, self.sp, self.plan = ev, sp, plan
        self.checked_is_autodiff = checked_is_autodiff
        self.f0, self.sigma, self.u, self.float64, self.f_scale = f0, sigma, u, float64, f_scale
        self.seed = seed
        # Every direction gets the 2h stencil (two extra evaluations), so that a kink crossed
        # along it is seen whatever the gradient says.
        self.schedule = dataclasses.replace(schedule, method=Method.CENTRAL, everywhere=True)

    def _x(self, k: int) -> np.ndarray:
        return self.plan.leaf_values(self.sp, k).astype(self.plan.dtypes[k])

    def weights(self, k: int, j: int) -> np.ndarray:
        """Direction j of leaf k, scaled per entry like the coordinate step; zero on entries
        that are not finite (a step cannot move them)."""
        spec = self.sp.checked_specs()[k]
        x = self.plan.leaf_values(self.sp, k)
        finite = self.sp.finite(k)
        return np.where(finite, direction(self.seed, spec.path, j, spec.size)
                        * np.maximum(1.0, np.abs(np.where(finite, x, 0.0))), 0.0)

    def test(self, probes: Directions, g_round, g_ad, groups=None) -> DirectionResult:
        """The probes judged by the coordinate error model (estimate.derivative); `groups`:
        per probe, its leaf, where several leaves are tested together (None: one leaf)."""
        checked = probes.checked
        # The checked gradient's own rounding along the direction. Its entries' rounding errors
        # are independent, so they add in quadrature; each bound (estimate.rounding) is ~16
        # ulps, so the quadrature sum of the bounds is itself ~16 standard deviations. (Adding
        # the bounds would grow like n, not sqrt(n): 900x too wide for a leaf of 800k entries.)
        checked_err = np.array([np.linalg.norm(probes.rows[v][a:b] * g_round[a:b])
                                for v, a, b in zip(probes.vid, probes.lo, probes.hi)])
        autodiff = None if g_ad is None else probes.dot(g_ad)
        d = dq.differences(self.f0, len(checked), self.sigma, self.u, self.float64,
                           self.f_scale)
        found = es.derivative(probes.evaluate, d, checked, checked_err, autodiff, checked_err,
                              schedule=self.schedule,
                              checked_is_autodiff=self.checked_is_autodiff, groups=groups)
        tol = em.tolerance(found.model.error + checked_err, found.model.value,
                           self.schedule.rtol, self.schedule.atol)
        norm = probes.norms()
        strict = found.cmp.status.copy()
        with np.errstate(invalid="ignore"):
            strict[(strict == dq.OK) & ~(np.abs(checked - found.model.value) <= tol)] = \
                dq.MISMATCH
        accept = em.acceptance(found.model, tol, checked_err, self.schedule.rtol,
                               self.schedule.atol)
        return DirectionResult(found.model.value, checked, autodiff, found.cmp.status,
                               None if found.cmp_ad is None else found.cmp_ad.status, strict,
                               tol, accept, norm, found.model.kink)

    def phase(self, checked, autodiff, samples: int, rounding):
        """Directions in every leaf. Returns the plan with the entries to check one by one added
        (those group testing left in doubt, and a sample of every leaf the directions resolve
        no better than COARSE: directions alone would leave it unverified), the outcome per
        leaf, and the paths of the leaves that got a sample that way."""
        outcomes, entries, escalated = {}, list(self.plan.entries), []
        extra = pl.sample_entries(self.sp, samples, self.seed, checked)
        for k in range(len(self.sp.checked)):
            g = np.asarray(checked[k], np.float64).ravel()
            g_ad = None if autodiff is None else np.asarray(autodiff[k], np.float64).ravel()
            outcomes[k] = self.run_leaf(k, g, rounding(checked[k]), g_ad)
            entries[k] = np.union1d(entries[k], pl.with_partners(
                self.sp.checked_specs()[k], outcomes[k].candidates)).astype(np.int64)
            entries[k] = entries[k][self.sp.finite(k)[entries[k]]]  # a step cannot move them
            if outcomes[k].resolution > COARSE and len(entries[k]) < len(extra[k]):
                entries[k] = np.union1d(entries[k], extra[k]).astype(np.int64)
                escalated.append(self.sp.checked_specs()[k].path or "<params>")
        return dataclasses.replace(self.plan, entries=tuple(entries)), outcomes, escalated

    def run_leaf(self, k: int, g: np.ndarray, g_round: np.ndarray, g_ad: np.ndarray | None,
                 n_directions: int = N_DIRECTIONS, localize: bool = True) -> LeafOutcome:
        """The directional tests of leaf k and, where one fails and `localize`, group
        testing."""
        size = self.sp.checked_specs()[k].size
        if size == 0:
            return LeafOutcome(None, np.zeros(0, np.int64))
        dt, h = self.plan.dtypes[k], pl.nominal_step(self.plan, k, Method.CENTRAL)
        rows = np.stack([(h * self.weights(k, j)).astype(dt) for j in range(n_directions)])
        on_device = self.ev.vectors(rows)
        every = np.arange(n_directions)
        probes = Directions(self.ev, self._x(k), k, rows, on_device, every,
                            np.zeros(n_directions), np.full(n_directions, size), g)
        tests = self.test(probes, g_round, g_ad)
        failing = np.flatnonzero(tests.strict == dq.MISMATCH)
        candidates, kinks = np.zeros(0, np.int64), 0
        if failing.size and localize:
            candidates, kinks = self._localize(k, rows, on_device, int(failing[0]), size, g,
                                               g_round)
        return LeafOutcome(tests, candidates, kinks)

    def run_leaves(self, ks, g: np.ndarray, g_round: np.ndarray, g_ad: np.ndarray | None
                   ) -> dict[int, LeafOutcome]:
        """The directional tests of the leaves `ks` at once, without group testing: one batch
        through one program over all the parameters (`g`, `g_round`, `g_ad`: flat over them
        all), where direction j of leaf k is leaf k's own (`weights`) and zero elsewhere. One
        compilation serves every leaf, where run_leaf compiles one per leaf.

        Every leaf must be in one dtype, the evaluator's: x + s v is then rounded per entry in
        the leaf's own dtype on the device, as the displacements (exact_displacements) assume.
        """
        sp, n_dir = self.sp, N_DIRECTIONS
        rows = np.zeros((n_dir, sp.n))
        for k in ks:
            h = pl.nominal_step(self.plan, k, Method.CENTRAL)
            for j in range(n_dir):
                rows[j, sp.offsets[k]:sp.offsets[k + 1]] = (
                    h * self.weights(k, j)).astype(self.plan.dtypes[k])
        dtype = self.plan.dtypes[ks[0]]
        lo = np.repeat([sp.offsets[k] for k in ks], n_dir)
        hi = np.repeat([sp.offsets[k + 1] for k in ks], n_dir)
        probes = Directions(self.ev, self.plan.theta.astype(dtype), None, rows.astype(dtype),
                            self.ev.vectors(rows.astype(dtype)), np.tile(np.arange(n_dir),
                                                                         len(ks)), lo, hi, g)
        tests = self.test(probes, g_round, g_ad, groups=np.repeat(np.arange(len(ks)), n_dir))
        return {k: LeafOutcome(tests.take(slice(i * n_dir, (i + 1) * n_dir)),
                               np.zeros(0, np.int64)) for i, k in enumerate(ks)}

    def _localize(self, k, rows, on_device, v, size, g, g_round) -> tuple[np.ndarray, int]:
        """Halves the range of entries until groups of GROUP_LEAF; returns the entries left in
        doubt (contiguous halves: each test is a range of the same direction), and how many
        of the tests were at kinks."""
        frontier, found, kinks = [(0, size)], [], 0
        while frontier and len(found) < MAX_FOUND:
            found += [r for r in frontier if r[1] - r[0] <= GROUP_LEAF]
            halves = [h for a, b in frontier if b - a > GROUP_LEAF
                      for h in ((a, (a + b) // 2), ((a + b) // 2, b))]
            if not halves:
                break
            lo, hi = (np.array(x) for x in zip(*halves))
            probes = Directions(self.ev, self._x(k), k, rows, on_device,
                                np.full(len(halves), v), lo, hi, g)
            tests = self.test(probes, g_round, None)
            kinks += int(np.sum(tests.kink))
            frontier = [r for r, s in zip(halves, tests.strict) if s == dq.MISMATCH][:MAX_FOUND]
        if not found:
            return np.zeros(0, np.int64), kinks
        return np.concatenate([np.arange(a, b) for a, b in found]), kinks


def _unseen_kinks(report, outcome: LeafOutcome, t: DirectionResult, n_kink: int) -> bool:
    """Whether failing directions that group testing did not pin on any entry may be the bias
    of kinks crossed unseen, with no second opinion to say otherwise (jax.grad is the gradient
    checked, or unavailable): the leaf's entries or directions were seen at kinks.

    A direction moves every entry of the leaf at once, so where a sample of its entries, or
    the parts of a direction group testing tried, show kinks, it crosses the kinks of all of
    them: many more than one entry's step, and those the kink test misses bias its difference
    quotient (diagnose._unseen_kinks). A float32 relu LSTM's weights failed their directions
    with none of 16 sampled entries wrong, 5 at kinks, or every part of the direction at a
    kink, where float64 confirms jax.grad. A bug the directions see and the entries do not is
    then not verified either: the leaf is unresolved, and x64=True decides."""
    return (report.n_mismatch == 0 and t.autodiff is None
            and report.n_kink + n_kink + outcome.kinks > 0)


def merge(report, outcome: LeafOutcome, judge_resolution: bool = True):
    """Folds a leaf's directional outcome into its (coordinate) LeafReport.

    Returns (report, agrees): `agrees` says whether the checked gradient agrees with jax.grad
    along the failing directions (None when that is not known), for the three-way triage.
    A failing direction whose wrong entries group testing could not isolate leaves the leaf a
    mismatch "as a whole": the report then shows the directional derivatives, never entries
    that agree.
    """
    t = outcome.tests
    report = dataclasses.replace(report, directions=outcome.n)
    if t is None:
        return report, None
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(t.numerical - t.checked) / np.maximum.reduce(
            [np.abs(t.numerical), np.abs(t.checked), t.tol])
    ad_status = report.autodiff_status
    if outcome.autodiff_ok is False:
        ad_status = Status.MISMATCH
    n_kink = int(np.sum(np.isin(t.status, (dq.KINK, dq.TIE))))
    # The leaf's resolution: the better of its entries' and its directions' (the acceptance
    # width relative to the measured directional derivative). Directions that cannot tell a
    # 100% error verify nothing: a leaf checked by them alone is then unresolved.
    dir_res = outcome.resolution
    resolution = min(np.inf if report.resolution is None else report.resolution, dir_res)
    worst_rel = float(np.max(np.nan_to_num(rel, nan=np.inf))) if rel.size else 0.0
    changes = dict(max_rel_error=max(report.max_rel_error, worst_rel),
                   autodiff_status=ad_status, direction_kinks=n_kink, resolution=resolution)
    if report.status in (Status.OK, Status.KINK) and not report.zero and resolution >= UNRESOLVED \
            and judge_resolution:
        changes["status"] = Status.UNRESOLVED
    elif n_kink and report.status == Status.OK:
        changes["status"] = Status.KINK
    agrees = None
    failed = outcome.failed
    if failed.any() and _unseen_kinks(report, outcome, t, n_kink):
        changes.update(status=Status.UNRESOLVED, limited_by="kinks", resolution=math.inf,
                       n_rough=report.n_rough + int(failed.sum()))
    elif failed.any():
        changes["status"] = Status.MISMATCH
        if t.autodiff is not None:
            agrees = bool(np.all(np.abs(t.checked - t.autodiff)[failed] <= t.tol[failed]))
        if report.n_mismatch == 0:  # not localised: show the directional derivatives
            j = int(np.argmax(np.where(failed, rel, -1)))
            changes.update(numerical=t.numerical[j] / t.norm[j],
                           checked=t.checked[j] / t.norm[j],
                           autodiff=None if t.autodiff is None
                           else t.autodiff[j] / t.norm[j], worst_index=None, worst=())
            # A constant factor (or sign, or zero) fits every direction within its error bar.
            # Two directions fit almost any factor within float32 error bars: the factor must
            # also explain 90% of the discrepancy by itself.
            pattern, factor = find_pattern(t.checked, t.numerical, np.zeros(len(t.checked)),
                                           t.tol, (len(t.checked),), full=False)
            fitted = t.numerical * (factor if factor is not None else 0.0)
            tight = (np.linalg.norm(t.checked - fitted)
                     <= 0.1 * np.linalg.norm(t.checked - t.numerical))
            if pattern in (Pattern.SCALE, Pattern.SIGN, Pattern.ZERO) and tight:
                changes.update(pattern=pattern, factor=factor)
    return dataclasses.replace(report, **changes), agrees
