"""mode="directional": random directions per leaf, then group testing to find wrong entries.

A full check costs two loss evaluations per parameter. Directional mode costs a few per leaf.
For a random sign vector v over a leaf (scaled per entry like the coordinate step), the loss
moved by exact steps d+ = fl(x + t w) - x and d- = x - fl(x - t w) (w_i = v_i max(1, |x_i|))
changes by

    f(x + d+) - f(x - d-) = g_true . (d+ + d-) + T t**3 + noise,

so r(t) = f(x + d+) - f(x - d-) - g . (d+ + d-) holds the bug's projection B = (g_true - g) . d
(linear in t) and the third-order term T (cubic in t). From t = h and 2h, B = (8 r(h) - r(2h))/6
with the cubic term removed. Its rounding error is at most 3 delta (delta: one loss value's
bound), plus the checked gradient's own rounding over the direction. A wrong entry i moves B by
|g_i - g_true,i| |d_i|, whatever its sign: a single wrong entry cannot hide from a sign vector.

Group testing. When a leaf fails, its entries are split in halves and each half is tested the
same way (4 evaluations); failing halves are split again, down to GROUP_LEAF entries, which are
checked one by one with the same coordinate error model as mode="full". Finding one wrong entry
among n costs about 8 log2(n / GROUP_LEAF) + 4 GROUP_LEAF evaluations instead of 2n.

Directions are seeded by (seed, crc32(path), j): adding a leaf changes no other leaf's.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from jgc._src import estimate as es
from jgc._src import plan as pl

N_DIRECTIONS = 2
GROUP_LEAF = 8  # entries checked one by one at the bottom of group testing
MAX_FOUND = 8  # stop localising after this many wrong entries in one leaf


@dataclasses.dataclass(frozen=True)
class DirectionTest:
    """One directional test: the Richardson-combined discrepancy and what it may be."""

    numerical: float  # (8 Δf(h) - Δf(2h)) / 6: the loss change along the direction
    checked: float  # g . (d+ + d-)
    autodiff: float | None
    tol: float  # allowed |numerical - checked|
    norm: float  # ||d+ + d-||: divides the above into directional derivatives

    @property
    def ok(self) -> bool:
        return abs(self.numerical - self.checked) <= self.tol

    @property
    def autodiff_ok(self) -> bool | None:
        return None if self.autodiff is None else abs(self.numerical - self.autodiff) <= self.tol


@dataclasses.dataclass
class LeafOutcome:
    """What directional mode found in one leaf."""

    tests: list[DirectionTest]
    candidates: np.ndarray  # local entry indices checked one by one after group testing

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tests)

    @property
    def autodiff_ok(self) -> bool | None:
        flags = [t.autodiff_ok for t in self.tests]
        return None if any(f is None for f in flags) else all(flags)


def direction(seed: int, path: str, j: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(path.encode()), j])
    return rng.choice(np.array([-1.0, 1.0]), size=size)


class Directional:
    """Runs directional tests and group testing on one check's evaluator."""

    def __init__(self, ev, sp, plan: pl.Plan, f0: float, sigma: float | None, u: float,
                 float64: bool, f_scale: float, seed: int):
        self.ev, self.sp, self.plan = ev, sp, plan
        self.f0, self.sigma, self.u, self.float64, self.f_scale = f0, sigma, u, float64, f_scale
        self.seed = seed

    def tests(self, k: int, vectors: np.ndarray, on_device, specs, g, g_round, g_ad
              ) -> list[DirectionTest]:
        """Directional tests of leaf k, evaluated in one batch (4 evaluations each).

        `vectors` holds step vectors (rows, in the leaf's dtype; `on_device` is their device
        copy); each spec (v1, v2, lo, hi) tests the steps vectors[v1] (h) and vectors[v2] (2h)
        restricted to entries lo..hi-1.
        """
        dt = self.plan.dtypes[k]
        x = self.plan.leaf_values(self.sp, k).astype(dt)
        vid, mult, lo, hi, pieces = [], [], [], [], []
        for v1, v2, a, b in specs:
            for v, c in ((v1, 1.0), (v1, -1.0), (v2, 1.0), (v2, -1.0)):
                vid.append(v), mult.append(c), lo.append(a), hi.append(b)
            xr = x[a:b]
            with np.errstate(over="ignore"):  # the exact steps the device takes: fl(x ± s) - x
                s1 = ((xr + vectors[v1][a:b]) - (xr - vectors[v1][a:b])).astype(np.float64)
                s2 = ((xr + vectors[v2][a:b]) - (xr - vectors[v2][a:b])).astype(np.float64)
            pieces.append((a, b, s1, s2))
        f = self.ev.along(k, on_device, vid, mult, lo, hi).reshape(len(specs), 4)
        out = []
        for (a, b, s1, s2), (fp1, fm1, fp2, fm2) in zip(pieces, f):
            numerical = (8 * (fp1 - fm1) - (fp2 - fm2)) / 6
            size = max(abs(fp1), abs(fm1), abs(fp2), abs(fm2), abs(self.f0), self.f_scale)
            delta = float(es.noise_bound(self.sigma, size, self.u, self.float64))
            # (8 r1 - r2) / 6 carries 8/6 of r1's and 1/6 of r2's errors: 3 delta from the four
            # loss values, and the checked gradient's rounding over both directions.
            grad_err = (8 * np.abs(s1) @ g_round[a:b] + np.abs(s2) @ g_round[a:b]) / 6
            tol = es.TOL_FACTOR * (3 * delta + grad_err)
            out.append(DirectionTest(numerical, float(g[a:b] @ s1), None if g_ad is None
                                     else float(g_ad[a:b] @ s1), tol, float(np.linalg.norm(s1))))
        return out

    def _h(self, k: int) -> float:
        return pl.nominal_step(self.plan, k, "central")

    def weights(self, k: int, j: int) -> np.ndarray:
        spec = self.sp.checked_specs()[k]
        x = self.plan.leaf_values(self.sp, k)
        return direction(self.seed, spec.path, j, spec.size) * np.maximum(1.0, np.abs(x))

    def run_leaf(self, k: int, g: np.ndarray, g_round: np.ndarray, g_ad: np.ndarray | None,
                 n_directions: int = N_DIRECTIONS) -> LeafOutcome:
        """The directional tests of leaf k and, where one fails, group testing."""
        size = self.sp.checked_specs()[k].size
        if size == 0:
            return LeafOutcome([], np.zeros(0, np.int64))
        dt, h = self.plan.dtypes[k], self._h(k)
        vectors = np.stack([(t * self.weights(k, j)).astype(dt)
                            for j in range(n_directions) for t in (h, 2 * h)])
        on_device = self.ev.vectors(vectors)
        specs = [(2 * j, 2 * j + 1, 0, size) for j in range(n_directions)]
        tests = self.tests(k, vectors, on_device, specs, g, g_round, g_ad)
        failing = [j for j, t in enumerate(tests) if not t.ok]
        candidates = np.zeros(0, np.int64)
        if failing:
            j = failing[0]
            candidates = self._localize(k, vectors, on_device, (2 * j, 2 * j + 1), size, g,
                                        g_round)
        return LeafOutcome(tests, candidates)

    def _localize(self, k, vectors, on_device, pair, size, g, g_round) -> np.ndarray:
        """Halves the range of entries until groups of GROUP_LEAF; returns the entries left in
        doubt (contiguous halves: each test is a range of the same direction)."""
        frontier, found = [(0, size)], []
        while frontier and len(found) < MAX_FOUND:
            found += [r for r in frontier if r[1] - r[0] <= GROUP_LEAF]
            halves = [h for a, b in frontier if b - a > GROUP_LEAF
                      for h in ((a, (a + b) // 2), ((a + b) // 2, b))]
            if not halves:
                break
            specs = [(*pair, a, b) for a, b in halves]
            tests = self.tests(k, vectors, on_device, specs, g, g_round, None)
            frontier = [r for r, t in zip(halves, tests) if not t.ok][:MAX_FOUND]
        if not found:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(a, b) for a, b in found])


def merge(report, outcome: LeafOutcome, g: np.ndarray, g_ad: np.ndarray | None):
    """Folds a leaf's directional outcome into its (coordinate) LeafReport.

    Returns (report, agrees): `agrees` says whether the checked gradient agrees with jax.grad
    along the failing directions (None when that is not known), for the three-way triage.
    """
    tests = outcome.tests
    report = dataclasses.replace(report, directions=len(tests))
    if not tests:
        return report, None
    worst = max(tests, key=lambda t: abs(t.numerical - t.checked) / max(t.tol, 1e-300))
    rel = abs(worst.numerical - worst.checked) / max(abs(worst.numerical), abs(worst.checked),
                                                     worst.tol)
    ad_status = report.autodiff_status
    if outcome.autodiff_ok is False:
        ad_status = "mismatch"
    changes = dict(max_rel_error=max(report.max_rel_error, rel), autodiff_status=ad_status)
    agrees = None
    if not outcome.ok:
        changes["status"] = "mismatch"
        failing = [t for t in tests if not t.ok]
        if g_ad is not None:
            agrees = all(abs(t.checked - t.autodiff) <= t.tol for t in failing)
        if report.n_mismatch == 0:  # not localised: show the directional derivatives
            changes.update(numerical=worst.numerical / worst.norm,
                           checked=worst.checked / worst.norm,
                           autodiff=None if worst.autodiff is None
                           else worst.autodiff / worst.norm, worst_index=None)
            # A constant factor shows as the same ratio checked/numerical in every direction.
            ratios = [t.checked / t.numerical for t in tests if t.numerical != 0]
            if len(ratios) == len(tests) and np.ptp(ratios) <= 1e-3 * abs(np.mean(ratios)):
                a = float(np.mean(ratios))
                changes.update(pattern="sign" if abs(a + 1) < 1e-3 else "scale",
                               factor=-1.0 if abs(a + 1) < 1e-3 else a)
    return dataclasses.replace(report, **changes), agrees
