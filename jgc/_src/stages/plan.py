"""Stage `plan`: which entries to perturb, at what precision, and by how much.

Step size. A central difference (f(x+h) - f(x-h)) / 2h has two errors:
  * truncation, h**2 |f'''| / 6, which grows with h, and
  * rounding, about u |f| / h (u = the evaluation dtype's machine epsilon), which shrinks with h.
Their sum is smallest at h* = (3 u |f| / |f'''|) ** (1/3). We do not know f''', so we use the
standard choice (Dennis & Schnabel, "typical x" = 1; Numerical Recipes 5.7)

    h = u ** (1/3) * max(1, |x|)

which assumes the loss varies on a scale of about 1 in each parameter (true for weights that pass
through O(1) nonlinearities) and scales the step with |x| for large entries, so that x + h differs
from x in the leading third of its digits. In float64 that is h ~ 6e-6 and gives ~10 correct
digits; in float32 h ~ 5e-3 and only ~3 to 5 digits, which is why the error model (estimate.py)
comes from the dtype and not from fixed constants. The step actually taken is the exactly
representable (x + h) - x, computed in the leaf's evaluation dtype, so that no representation
error of x + h leaks into the difference quotient.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.report.vocab import Method, Mode
from jgc._src.stages.split import Split, real_view

HALF = ("float16", "bfloat16")
MAX_NOISE_PROBES = 16  # Leaves whose loss noise is measured (9 evaluations each).
# In directional mode, a probe of a large leaf costs as much as a full forward pass: the two
# largest leaves, which feed the most computation, stand for the rest.
DIRECTIONAL_NOISE_PROBES = 2
# mode="auto" runs a full check when it is predicted to take at most this long (2 loss
# evaluations per parameter, timed on one evaluation), else directions plus a sample.
AUTO_SECONDS = 5.0
DEFAULT_SAMPLES = 16  # Entries per leaf in mode="sample" (the CS231n notes check ~10 at random).


def eval_dtype(dtype: str, x64: bool) -> np.dtype:
    """The (real) dtype a leaf is evaluated in; a complex leaf's is its parts' dtype (its real
    view is what is perturbed; the loss sees the complex array rebuilt in the matching complex
    dtype, so complex64 becomes complex128 under x64).

    float64 under x64. Otherwise the leaf's own dtype as JAX would hold it under the current
    configuration (float64 becomes float32 unless the user enabled x64 globally), with half
    precision promoted to float32: with ~3 significant digits, differences of float16 losses are
    mostly rounding noise.
    """
    if x64:
        return np.dtype(np.float64)
    if np.issubdtype(np.dtype(dtype), np.complexfloating):
        dtype = str(np.finfo(np.dtype(dtype)).dtype)  # complex64 -> float32
    if dtype in HALF:
        return np.dtype(np.float32)
    return np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(dtype)))


def machine_eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to perturb: for each checked leaf, the flat entries and their (exact) steps."""

    mode: str
    method: str
    x64: bool
    dtypes: tuple[np.dtype, ...]  # Evaluation dtype of each checked leaf.
    entries: tuple[np.ndarray, ...]  # Flat indices *within* each checked leaf.
    theta: np.ndarray  # The checked leaves, flattened, in float64 (exact copy of the values).
    step_rule: str  # Human-readable description of the step, for the report header.
    eps: float | None  # The user's step override, if any.
    # The loss's measured relative noise per evaluation (sigma / |f|), once known: when it is
    # above a leaf's machine epsilon (a loss that computes in float32 inside a float64 check),
    # the step balances truncation against *that* noise instead (see `unit`).
    noise: float = 0.0

    def leaf_values(self, sp: Split, k: int) -> np.ndarray:
        return self.theta[sp.offsets[k]:sp.offsets[k + 1]]


def make_plan(sp: Split, *, mode: str, x64: bool, eps: float | None, samples: int,
              seed: int, method: str = Method.CENTRAL) -> Plan:
    """The plan for options already validated (inputs.make_options)."""
    specs = sp.checked_specs()
    dtypes = tuple(eval_dtype(s.dtype, x64) for s in specs)
    theta = np.concatenate(
        [real_view(sp.leaves[i]).ravel() for i in sp.checked] or [np.zeros(0)])
    if mode in (Mode.FULL, Mode.AUTO):  # "auto" decides once it has timed one evaluation
        entries = [np.flatnonzero(sp.finite(k)) for k in range(len(specs))]
    else:
        entries = sample_entries(sp, 0 if mode == Mode.DIRECTIONAL else samples, seed)
    plan = Plan(mode, method, x64, dtypes, tuple(entries), theta, "", eps)
    return dataclasses.replace(plan, step_rule=step_rule(plan))


def unit(plan: Plan, k: int) -> float:
    """The relative error of one loss value that leaf k's step balances against truncation:
    the machine epsilon of its evaluation dtype, or the loss's measured relative noise when
    that is larger (capped at float16's epsilon: beyond it differences carry no digits)."""
    return max(machine_eps(plan.dtypes[k]), min(plan.noise, machine_eps(np.float16)))


def nominal_step(plan: Plan, k: int, method: str | None = None) -> float:
    """The step of leaf k before scaling by max(1, |x|): unit**power, the power balancing the
    method's truncation against rounding (vocab.Method.step_power; the module doc)."""
    if plan.eps is not None:
        return plan.eps
    return unit(plan, k) ** Method(method or plan.method).step_power


def tangent_step(plan: Plan, t: np.ndarray) -> float:
    """The step along a direction t over all the parameters (check_jvp, check_hvp): the
    nominal step of the coarsest leaf dtype, times the parameters' typical magnitude
    max(1, median |theta|), divided by t's typical entry, rounded down to a power of two (so
    that s h t is exact to scale for the stencils' multipliers s, powers of two too)."""
    t = np.abs(np.asarray(t, np.float64))
    size = float(np.median(t[t > 0])) if np.any(t > 0) else 1.0
    if plan.eps is not None:  # a fixed absolute step, along a direction of typical size 1
        return plan.eps / size
    nominal = max(nominal_step(plan, k, Method.CENTRAL) for k in range(len(plan.dtypes)))
    typical = max(1.0, float(np.median(np.abs(plan.theta)))) if plan.theta.size else 1.0
    return 2.0 ** math.floor(math.log2(nominal * typical / size))


def step_rule(plan: Plan) -> str:
    """The step rule for the report header, e.g. 'h = 6.1e-06·max(1,|θ|)'."""
    if plan.eps is not None:
        return f"h = {plan.eps:.1e} (fixed)"
    hs = sorted({f"{nominal_step(plan, k):.1e}" for k in range(len(plan.dtypes))}) or ["-"]
    noisy = any(plan.noise > machine_eps(d) for d in plan.dtypes)
    return (f"h = {'/'.join(hs)}·max(1,|θ|)"
            + (f" (from the loss's measured noise, {plan.noise:.1e} relative)" if noisy else ""))


def with_noise(plan: Plan, relative_noise: float) -> Plan:
    """The plan once the loss's relative noise per evaluation is measured."""
    plan = dataclasses.replace(plan, noise=float(relative_noise))
    return dataclasses.replace(plan, step_rule=step_rule(plan))


# A sample spends this fraction of its entries on the largest gradient entries of the leaf:
# they are the best resolved (the error bar is about the same for every entry of a leaf), so a
# wrong factor shows there first, and a leaf whose activations zero most of its gradient (relu,
# dead units) is not left with a sample of zeros that verifies nothing.
LARGEST_FRACTION = 0.25


def sample_entries(sp: Split, samples: int, seed: int, magnitudes=None) -> list[np.ndarray]:
    """Up to `samples` entries of each checked leaf, seeded by the leaf's path, so that adding
    a leaf does not move any other leaf's sample. With `magnitudes` (one array per checked
    leaf: the gradient's), a quarter of each sample are the largest entries, the rest random.

    In a complex leaf a sample is of complex entries, each with both parts (so that every
    sampled entry's complex derivative is known): up to `samples` real-view entries."""
    out = []
    for k, spec in enumerate(sp.checked_specs()):
        out.append(_sample(sp, k, spec, samples, seed, magnitudes))
        out[-1] = out[-1][sp.finite(k)[out[-1]]]  # non-finite entries cannot be moved
    return out


def _sample(sp: Split, k: int, spec, samples: int, seed: int, magnitudes) -> np.ndarray:
    """Leaf k's sample (see `sample_entries`)."""
    parts = 2 if spec.is_complex else 1
    count, n = -(-samples // parts), spec.n_entries  # ceil: 0 stays 0 (directional)
    if spec.size <= samples or n <= count:
        return np.arange(spec.size)
    if count == 0:
        return np.zeros(0, np.int64)
    top = np.zeros(0, np.int64)
    if magnitudes is not None:
        mag = np.abs(np.asarray(magnitudes[k], np.float64)).reshape(n, parts).max(axis=1)
        top = _largest(np.nan_to_num(mag, nan=np.inf), int(math.ceil(count * LARGEST_FRACTION)))
    rng = np.random.default_rng([seed, zlib.crc32(spec.path.encode())])
    rest = np.ones(n, bool)  # the complement of `top`, in order (setdiff1d without its
    rest[top] = False  # sort: 0.2 s per call on a 3M-entry leaf)
    rest = np.flatnonzero(rest)
    pick = np.sort(np.concatenate([top, rng.choice(rest, size=count - len(top),
                                                    replace=False)])).astype(np.int64)
    return with_partners(spec, pick * parts)


def _largest(size: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values, ties to the lower index: the first k of a stable
    argsort of -size, in O(n) (argsort of a 3M-entry leaf took 0.3 s)."""
    if k >= len(size):
        return np.arange(len(size))
    if k <= 0:
        return np.zeros(0, np.int64)
    threshold = np.partition(size, len(size) - k)[len(size) - k]
    above = np.flatnonzero(size > threshold)
    tied = np.flatnonzero(size == threshold)[:k - len(above)]
    return np.concatenate([above, tied]).astype(np.int64)


def with_partners(spec, entries: np.ndarray) -> np.ndarray:
    """Real-view entries of a leaf, with the other part of every complex entry among them."""
    entries = np.asarray(entries, np.int64)
    if not spec.is_complex:
        return entries
    return np.union1d(entries, entries ^ 1)  # the parts of entry j are 2j and 2j + 1


def steps(plan: Plan, sp: Split, k: int, scale: float = 1.0, method: str | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Exact forward and backward steps (h+, h-) for the planned entries of checked leaf k.

    `scale` multiplies the nominal step (2.0 for the second, wider stencil); `method` picks the
    step rule (default: the plan's).
    """
    dt = plan.dtypes[k]
    x = plan.leaf_values(sp, k)[plan.entries[k]].astype(dt)
    h = nominal_step(plan, k, method) * (np.maximum(1.0, np.abs(x)) if plan.eps is None else 1.0)
    h = np.broadcast_to(h, x.shape)
    h = (scale * h).astype(dt)
    with np.errstate(over="ignore"):
        hp = ((x + h) - x).astype(np.float64)
        hm = (x - (x - h)).astype(np.float64)
    return hp, hm


def noise_probes(plan: Plan, sp: Split, limit: int = MAX_NOISE_PROBES, widen: int = 0
                 ) -> list[tuple[int, np.ndarray]]:
    """Points at which to measure the loss's noise: (flat index, 9 steps) for up to
    MAX_NOISE_PROBES leaves, the largest first.

    Each probe moves one entry x (the leaf's largest planned entry: it usually feeds the most
    computation) through 9 equally spaced points. The spacing t is a power of two at most
    sqrt(u)·max(1, |x|), small enough that the 3rd and higher differences of a smooth loss,
    ~t**3, sit far below rounding noise ~u. The points step toward zero and stay above |x|/2
    (t <= |x|/16), so every x - j·t is a multiple of ulp(x) in the same or a lower binade:
    exactly representable. Rounding the points would otherwise add noise of its own.

    `widen` multiplies the spacing by 2**(8 widen): for a loss that rounds its inputs to a
    coarser dtype than the check's (float32 inside a float64 check), points closer than that
    dtype's resolution all give the same value, and only a wider spacing sees its noise.
    """
    def weight(k: int) -> int:  # the largest leaves first; empty leaves last
        return -max(len(plan.entries[k]), 1) * (sp.offsets[k + 1] > sp.offsets[k])

    order = sorted(range(len(sp.checked)), key=weight)
    probes = []
    for k in order[:limit]:
        e = plan.entries[k]
        if len(e) == 0:  # directional mode: any entry of the leaf will do
            e = np.arange(sp.offsets[k + 1] - sp.offsets[k])
        if len(e) == 0:
            continue
        x = plan.leaf_values(sp, k)[e].astype(plan.dtypes[k])
        j = int(np.argmax(np.abs(x)))
        xj = float(x[j])
        target = machine_eps(plan.dtypes[k]) ** 0.5 * max(1.0, abs(xj)) * 2.0 ** (8 * widen)
        if xj != 0:
            target = min(target, abs(xj) / 16)
        t = 2.0 ** math.floor(math.log2(target))
        # One-sided, toward zero (or up from zero): a kink exactly at x (a relu at 0, a zero
        # bias) is then an end point, not a spike in the middle of the table.
        steps = (-math.copysign(1.0, xj) if xj != 0 else 1.0) * t * np.arange(9.0)
        probes.append((sp.offsets[k] + int(e[j]), steps))
    return probes
