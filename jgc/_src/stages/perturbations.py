"""The perturbations a derivative is measured at: how each kind moves the parameters.

estimate.derivative owns the stencil schedule for every kind; a probe kind says how stencil s
(step multiplier SCALES[s]) is evaluated, returning `estimate.Sides`:

* `Coordinates`: entry i of the flat vector, moved by its exact steps (check_grad's full and
  sample modes, and the entries directional mode confirms one by one).
* `Directions`: a step vector over one leaf, restricted to a range of its entries (directional
  mode and its group testing). The device adds mult * v with mult a power of two, so the
  displacement fl(x + s v) - x is exact, but not exactly s times the one at s = 1: each stencil
  is shifted by how much the checked change g . displacement / s differs from g . v.
* `Tangents`: directions over all the parameters, every output element of a vector function
  along each a probe (check_jvp, check_hvp): each stencil costs two evaluations per direction,
  whatever the output size.
"""

from __future__ import annotations

import math

import numpy as np

from jgc._src.report.vocab import Method
from jgc._src.stages import differences as dq
from jgc._src.stages import estimate as es
from jgc._src.stages import plan as pl
from jgc._src.stages.noise import CONFIRM, FINER
from jgc._src.stages.split import InputError, Split


def global_indices(sp: Split, plan: pl.Plan) -> np.ndarray:
    parts = [sp.offsets[k] + e for k, e in enumerate(plan.entries)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def all_steps(sp: Split, plan: pl.Plan, scale: float, method: str | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Exact (h+, h-) for every planned entry, all leaves concatenated."""
    pairs = [pl.steps(plan, sp, k, scale, method) for k in range(len(sp.checked))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


class Coordinates:
    """The planned entries of a coordinate check: entry index[j], both sides in one batch.

    A `deadline` (mode="auto") times the first stencil as it runs.
    """

    def __init__(self, ev, sp: Split, plan: pl.Plan, deadline=None):
        self.ev, self.sp, self.plan, self.deadline = ev, sp, plan, deadline
        self.index = global_indices(sp, plan)

    def evaluate(self, s: int, where: np.ndarray) -> es.Sides:
        # The fine stencils look closer than the central step, whatever the method's own step.
        hp, hm = all_steps(self.sp, self.plan, dq.SCALES[s],
                           Method.CENTRAL if s >= dq.FINE else None)
        hp, hm, idx = hp[where], hm[where], self.index[where]
        values = self.ev.perturbed(np.concatenate([idx, idx]), np.concatenate([hp, -hm]),
                                   deadline=self.deadline if s == 0 else None)
        k = len(idx)
        finite_or_refuse(self.sp, idx, values, k)
        return es.Sides(values[:k], values[k:], hp, hm)


def finite_or_refuse(sp: Split, index: np.ndarray, values: np.ndarray, m: int) -> None:
    bad = ~np.isfinite(values[:m]) | ~np.isfinite(values[m:])
    if not bad.any():
        return
    j = int(np.argmax(bad))
    raise InputError(
        f"the loss is finite at params but not at perturbed points: {int(bad.sum())} of {m} "
        f"entries give NaN/Inf, first at {sp.locate(index[j])} (f(x+h) = {values[j]}, "
        f"f(x-h) = {values[m + j]}). The step leaves the loss's domain there: either params "
        "sit on the edge of the domain (a sqrt or log at 0; move them inside it) or the step "
        "is too large (pass a smaller one, e.g. eps=1e-8).")


def _dots(g: np.ndarray, vectors, lo, hi) -> np.ndarray:
    """g . vectors[j] over entries lo[j]..hi[j]-1, for each j, in float64."""
    return np.array([g[a:b] @ v[a:b] for v, a, b in zip(vectors, lo, hi)])


class Directions:
    """Probes along step vectors `rows` of leaf k (None: over all the parameters): probe j is
    rows[vid[j]] restricted to entries lo[j]..hi[j]-1, with g . rows[vid[j]] as its checked
    value."""

    def __init__(self, ev, x: np.ndarray, k: int | None, rows: np.ndarray, on_device, vid, lo,
                 hi, g: np.ndarray):
        self.ev, self.x, self.k, self.rows, self.on_device, self.g = ev, x, k, rows, on_device, g
        self.vid, self.lo, self.hi = (np.asarray(a, np.int64) for a in (vid, lo, hi))
        self.checked = self.dot(g)

    def dot(self, g: np.ndarray) -> np.ndarray:
        return _dots(g, self.rows[self.vid], self.lo, self.hi)

    def norms(self) -> np.ndarray:
        return np.array([np.linalg.norm(self.rows[v][a:b])
                         for v, a, b in zip(self.vid, self.lo, self.hi)])

    def evaluate(self, s: int, where: np.ndarray) -> es.Sides:
        scale = dq.SCALES[s]
        vid, lo, hi = self.vid[where], self.lo[where], self.hi[where]
        n = len(vid)
        f = self.ev.along(self.k, self.on_device, np.concatenate([vid, vid]),
                          np.concatenate([np.full(n, scale), np.full(n, -scale)]),
                          np.concatenate([lo, lo]), np.concatenate([hi, hi]))
        # The checked value along the steps actually taken, on each probe's own entries only
        # (group testing probes ever smaller ranges of a large leaf).
        cp, cm = np.zeros(n), np.zeros(n)
        for j, (v, a, b) in enumerate(zip(vid, lo, hi)):
            (plus,), (minus,) = exact_displacements(self.x[a:b], [scale * self.rows[v][a:b]])
            cp[j], cm[j] = self.g[a:b] @ plus / scale, self.g[a:b] @ minus / scale
        c = self.checked[where]
        width = np.full(n, scale)
        return es.Sides(f[:n], f[n:], width, width, shift=((cp + cm) / 2 - c, cp - c, cm - c))


def exact_displacements(x: np.ndarray, steps) -> tuple[list, list]:
    """fl(x + step) - x and x - fl(x - step), in x's dtype (the steps the device takes)."""
    plus, minus = [], []
    for st in steps:
        st = np.asarray(st).astype(x.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            # Where the step is zero nothing moves, also at a NaN entry (NaN - NaN is NaN).
            plus.append(np.where(st == 0, 0.0, ((x + st) - x).astype(np.float64)))
            minus.append(np.where(st == 0, 0.0, (x - (x - st)).astype(np.float64)))
    return plus, minus


class Tangents:
    """A vector function F along directions over all the parameters (the rows of `T`): each
    (direction, output element) pair is a probe, direction-major. Each stencil costs two
    evaluations of F per direction, whatever the number of outputs, and all directions go in
    one batch.

    Direction j's step is h[j] (a power of two, `plan.tangent_step`); stencil s evaluates F at
    fl(x + s h t) and fl(x - s h t) over the nominal width 2 s h: it estimates J t_eff, with
    t_eff = (d+ + d-) / 2h the effective direction at s = 1 (`effective`), at which the checked
    rule is evaluated when jgc draws the direction.
    """

    def __init__(self, ev, x: np.ndarray, T: np.ndarray, h: np.ndarray, f0: np.ndarray):
        self.ev, self.x, self.h = ev, x, np.asarray(h, np.float64)
        self.f0 = np.asarray(f0, np.float64)
        self.n_dirs, self.m = len(T), self.f0.size
        self.rows = (self.h[:, None] * np.asarray(T, np.float64)).astype(ev.dtype)
        self.on_device = ev.vectors(self.rows)
        plus, minus = exact_displacements(x, list(self.rows))
        self.effective = np.stack([(p + q) / (2 * h) for p, q, h in zip(plus, minus, self.h)])

    def _along(self, vid, mult) -> np.ndarray:
        n = len(self.x)
        k = len(vid)
        out = self.ev.along(None, self.on_device, vid, mult, np.zeros(k, np.int64),
                            np.full(k, n))
        return np.asarray(out, np.float64).reshape(k, self.m)

    def evaluate(self, s: int, where: np.ndarray) -> es.Sides:
        scale = dq.SCALES[s]
        dirs = np.arange(self.n_dirs)
        f = self._along(np.concatenate([dirs, dirs]),
                        np.concatenate([np.full(self.n_dirs, scale),
                                        np.full(self.n_dirs, -scale)]))
        fp, fm = f[:self.n_dirs].ravel()[where], f[self.n_dirs:].ravel()[where]
        width = np.repeat(scale * self.h, self.m)[where]
        return es.Sides(fp, fm, width, width, f0=np.tile(self.f0, self.n_dirs)[where])

    def noise(self, u: float) -> np.ndarray | None:
        """Per probe: the output element's noise along its direction (ECnoise over 9 points
        spaced 2**k ~ sqrt(u) max|x| apart along sign(t)), or None where none is measurable."""
        spacing = 2.0 ** math.floor(math.log2(u ** 0.5 * max(
            1.0, float(np.max(np.abs(self.x))) if self.x.size else 1.0)))
        values = self._table(spacing)
        sigma = np.array([[dq.ecnoise(values[d, :, e], u) or np.nan for e in range(self.m)]
                          for d in range(self.n_dirs)])
        # Confirmed at a 256x finer spacing, as noise.measure confirms a loss's noise: rounding
        # keeps its level there, an oscillation at the probe's scale does not (noise._confirmed).
        doubtful = sigma > u * np.max(np.abs(values), axis=1)
        if np.any(doubtful):
            fine = self._table(spacing * FINER)
            for d, e in zip(*np.nonzero(doubtful)):
                if dq.staircase(fine[d, :, e]):
                    continue
                level = dq.ecnoise(fine[d, :, e], 0.0)
                if level is None or level * CONFIRM < sigma[d, e]:
                    sigma[d, e] = np.nan if level is None else level
        sigma = sigma.ravel()
        if not np.isfinite(sigma).any():
            return None
        return np.where(np.isnan(sigma), 0.0, sigma)

    def _table(self, spacing: float) -> np.ndarray:
        """F at 9 equally spaced points along sign(t) per direction: (directions, 9, outputs)."""
        ev = self.ev
        rows = ev.vectors(np.sign(self.rows.astype(np.float64)) * spacing)
        k = 9 * self.n_dirs
        return np.asarray(ev.along(None, rows, np.repeat(np.arange(self.n_dirs), 9),
                                   np.tile(np.arange(9.0), self.n_dirs), np.zeros(k, np.int64),
                                   np.full(k, len(self.x))), np.float64).reshape(
            self.n_dirs, 9, self.m)

