"""Forward-mode rules and second derivatives: `check_jvp` and `check_hvp`.

Both compare a directional derivative of a vector-valued function F (the outputs of f, or the
gradient of a loss) along a direction t with finite differences of F along t, through the same
stages as check_grad: F is evaluated by the same evaluator (one trace, batched programs,
chunking, the memory budget, devices), each (direction, output element) is a probe of the same
stencil schedule and error model (estimate.derivative, probes.Tangents: every element gets its
measured noise and the refinement levels), and the leaves are judged and reported by the same
compare and diagnose stages.

Which directions: the given tangents, or by `mode`: "auto" and "directional" draw `n_tangents`
seeded random ones (check_hvp adds every basis direction of leaves with at most BASIS_MAX
entries), "full" takes every basis direction (the whole Jacobian or Hessian, column by column),
"sample" a sample of them. Steps are exact: the perturbed points are x + d+ and x - d- with
d+ = fl(x + h t) - x; when jgc draws the direction, the rule is evaluated along the effective
direction (d+ + d-) / 2h, exactly the one measured.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from jgc._src import calls, explain
from jgc._src import compare as cp
from jgc._src import diagnose as dg
from jgc._src import estimate as es
from jgc._src import plan as pl
from jgc._src.evaluate import make_evaluator
from jgc._src.inputs import make_options, precision, refuse_unusable
from jgc._src.probes import Tangents
from jgc._src.progress import progress_factory
from jgc._src.recording import recorded
from jgc._src.report import Report
from jgc._src.tree import (
    InputError,
    LeafSpec,
    flat_output,
    flatten,
    listing,
    match_gradient,
    merge_parts,
    split_checked,
)
from jgc._src.vocab import Mode, Verdict

N_TANGENTS = 2  # seeded random tangents when none are given
BASIS_MAX = 16  # check_hvp also probes every basis direction of leaves up to this size
GROUP = 64  # directions evaluated per batch (each a row of the perturbation vectors)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """A vector function of the parameters, the directions to probe it along, and the rule."""

    ev: object  # the evaluator of F
    sp: object
    plan: pl.Plan
    directions: np.ndarray  # (T, n)
    effective: bool  # evaluate the rule along the measured (effective) directions
    rule: Callable  # flat direction -> flat checked derivative
    hessian: bool  # F is a gradient (jax's product may fall back to reverse-over-reverse)
    use_autodiff: bool  # jax's own derivative is a separate opinion
    checked_is_autodiff: bool  # the rule under test is jax's own


def _directions(sp, mode: Mode, seed: int, n_random: int, samples: int,
                basis_max: int) -> tuple[np.ndarray, str]:
    """The directions for a mode, and words for the report's note."""
    rng = np.random.default_rng(seed)
    random = [rng.standard_normal(sp.n) for _ in range(n_random)]
    if mode == Mode.FULL:
        entries = [np.arange(s.size) for s in sp.checked_specs()]
    elif mode == Mode.SAMPLE:
        entries = pl.sample_entries(sp, samples, seed)
    elif mode == Mode.DIRECTIONAL:
        entries = [np.zeros(0, np.int64) for _ in sp.checked_specs()]
    else:
        entries = [np.arange(s.size) if 0 < s.size <= basis_max else np.zeros(0, np.int64)
                   for s in sp.checked_specs()]
    basis = []
    for k, e in enumerate(entries):
        for j in e:
            v = np.zeros(sp.n)
            v[sp.offsets[k] + j] = 1.0
            basis.append(v)
    words = f"{n_random} seeded random" + (f", {len(basis)} basis" if basis else "")
    return np.stack(random + basis) if random or basis else np.zeros((0, sp.n)), words


def _measure(problem: _Problem, u: float, float64: bool, o):
    """Every direction, in groups: the error model, the checked and jax's derivatives."""
    parts, f0 = [], problem.ev.at()
    schedule = es.Schedule(everywhere=True, refine=o.refine, rtol=o.rtol, atol=o.atol)
    for a in range(0, len(problem.directions), GROUP):
        T = problem.directions[a:a + GROUP]
        h = np.array([pl.tangent_step(problem.plan, t) for t in T])
        probes = Tangents(problem.ev, problem.plan.theta.astype(problem.ev.dtype), T, h, f0)
        used = probes.effective if problem.effective else T
        checked = np.concatenate([problem.rule(t) for t in used])
        _require_size(checked, len(T) * probes.m)
        g_round = np.concatenate([cp.leaf_rounding(c) for c in checked.reshape(len(T), -1)])
        autodiff = None
        if problem.use_autodiff:
            autodiff, _ = calls.autodiff_jvp(problem.ev, used, hessian=problem.hessian)
            autodiff = None if autodiff is None else autodiff.ravel()
        d = es.differences(0.0, len(checked), probes.noise(u), u, float64)
        found = es.derivative(probes.evaluate, d, checked, g_round, autodiff, g_round,
                              schedule=schedule,
                              checked_is_autodiff=problem.checked_is_autodiff)
        parts.append(cp.compared(found.model, found.cmp, found.cmp_ad, checked, g_round,
                                 autodiff, g_round, o.rtol, o.atol))
    return parts, f0


def _require_size(checked: np.ndarray, size: int) -> None:
    if checked.size != size:
        raise InputError(f"the rule's output has {checked.size} entries, but f's output has "
                         f"{size}: tangent_out (or H·v) must be shaped like f(*primals) (or "
                         "like params).")


def _leaves(specs: list[LeafSpec], parts: list[cp.Compared], o):
    """One LeafReport per output leaf: its elements along every direction, pooled."""
    c = cp.concatenate(parts)
    m = sum(s.size for s in specs if s.checked)
    n_dirs = len(c.g) // max(m, 1)
    bounds = cp.Bounds(None if o.user_tolerance else es.zero_bound([c.g]),
                       0.0 if c.g_ad is None else es.zero_bound([c.g_ad]))
    leaves, agrees, offset = [], {}, 0
    for spec in specs:
        if not spec.checked:
            leaves.append(cp.skipped(spec))
            continue
        where = np.concatenate([d * m + offset + np.arange(spec.size) for d in range(n_dirs)])
        offset += spec.size
        data = cp.leaf_data(spec, np.tile(np.arange(spec.size), n_dirs),
                            np.zeros(len(where)), c.take(where), bounds, where)
        leaves.append(dg.leaf_report(data, full=False))
        agrees[spec.path] = dg.agrees_with_autodiff(data)
    return leaves, agrees, c


def _report(problem: _Problem, specs, parts, start, o, *, source, autodiff_name, noun, mode,
            method, notes) -> Report:
    leaves, agrees, c = _leaves(specs, parts, o)
    u = max(pl.machine_eps(d) for d in problem.plan.dtypes)
    verdict, text = explain.diagnosis(
        leaves, agrees, source=source, has_autodiff=c.g_ad is not None or source == autodiff_name,
        autodiff_why="f is not traceable by JAX", batch=None, autodiff=autodiff_name, noun=noun,
        float64=u <= pl.machine_eps(np.float64))
    header = cp.Header(source, "float64 (x64)" if o.x64 else "float32", method, mode,
                       "h = 2**k ≈ u**(1/3)·scale (exact)", len(c.g) // max(
                           len(problem.directions), 1), autodiff_name, noun)
    return cp.build_report(leaves, Verdict(verdict), text, header, n_checked=len(c.g),
                           n_evaluations=problem.ev.n_evaluations, start=start, notes=notes,
                           global_rel=cp.global_rel_error(c.g, c.model.value))


def _output_specs(out) -> list[LeafSpec]:
    """The output leaves, named by keystr of the output pytree (a bare array is '<out>')."""
    specs = []
    for path, leaf in flatten(out)[0]:
        if leaf is None:
            specs.append(LeafSpec(path, (), None, False, "not a float"))
            continue
        a = np.asarray(leaf)
        specs.append(LeafSpec(path or "<out>", tuple(a.shape), str(a.dtype), True, plain=True))
    return specs


@recorded
def check_jvp(f: Callable, f_jvp: Callable | None, primals, tangents=None, *,
              x64: bool = True, seed: int = 0, n_tangents: int = N_TANGENTS,
              mode: str = "auto", eps: float | None = None, samples: int = pl.DEFAULT_SAMPLES,
              memory_budget: int | None = None, progress: bool | None = None) -> Report:
    """Checks a forward-mode rule of `f` against finite differences of f along the tangents.

    Args:
      f: `f(*primals) -> out` (an array or a pytree of arrays), JAX or NumPy.
      f_jvp: `f_jvp(primals, tangents) -> (out, tangent_out)`, as `jax.jvp` returns. With None,
        `jax.jvp(f)` is checked: how a `jax.custom_jvp` rule is tested.
      primals: a tuple of f's inputs (a single array is a 1-tuple).
      tangents: a tuple shaped like primals, or None for directions chosen by `mode`. Complex
        primals and outputs are supported, holomorphic or not: a complex input entry is probed
        along its real and its imaginary direction (a complex tangent x + iy is the direction
        (x, y)), and a complex output element is compared by its real and imaginary parts.
      x64: evaluate in float64 (restored afterwards).
      mode: without tangents, which directions: "auto"/"directional" `n_tangents` seeded random
        ones, "full" every basis direction (the whole Jacobian), "sample" `samples` basis
        directions per input leaf.
      eps: a fixed step along each direction; None picks it from the dtype and the scale.
      memory_budget, progress: as for check_grad.

    Returns:
      A Report whose leaves are the output's leaves (paths as `keystr` of the output pytree),
      each entry an output element; entries are pooled over the directions.

    >>> import jax, jax.numpy as jnp, jgc
    >>> @jax.custom_jvp
    ... def f(x):
    ...     return jnp.sin(x)
    >>> f.defjvp(lambda p, t: (f(p[0]), 2 * jnp.cos(p[0]) * t[0]))  # wrong: the 2
    <...>
    >>> jgc.check_jvp(f, None, (jnp.linspace(0.1, 1, 4),)).ok
    False
    """
    start = time.perf_counter()
    calls.require_function(f, "f", "(*primals) -> out", "check_jvp(f, f_jvp, primals, ...)")
    if f_jvp is not None and not callable(f_jvp):
        raise InputError("f_jvp must be a function f_jvp(primals, tangents) -> (out, "
                         "tangent_out), or None to check jax.jvp of f.")
    primals = tuple(primals) if isinstance(primals, (tuple, list)) else (primals,)
    with precision(x64):
        o = make_options(x64=x64, mode=mode, eps=eps, samples=samples,
                         memory_budget=memory_budget, progress=progress, seed=seed)
        refuse_unusable(primals=primals, tangents=tangents)
        sp = split_checked(primals, "primals")
        plan = pl.make_plan(sp, mode=Mode.FULL, x64=x64, eps=eps, samples=0, seed=seed)
        ev = make_evaluator(lambda p: f(*p), sp, plan.theta, plan.dtypes, (), vector=True,
                            memory_budget=o.memory_budget, progress=progress_factory(progress))
        if f_jvp is None and not ev.traceable:
            raise InputError("f_jvp=None asks jgc to check jax.jvp of f, but JAX cannot trace "
                             "f. Pass your forward-mode rule as f_jvp.")
        if tangents is not None:
            t = np.concatenate([a.ravel() for a in match_gradient(
                tuple(tangents) if isinstance(tangents, (tuple, list)) else (tangents,), sp,
                primals, "tangents", tangent=True)])
            directions, words = t.astype(np.float64)[None], "1 given"
        else:
            directions, words = _directions(sp, o.mode, seed, n_tangents, samples, 0)
        out_holder = {}
        rule = _jvp_rule(f, f_jvp, sp, plan, out_holder)
        problem = _Problem(ev, sp, plan, directions, tangents is None, rule, False,
                           f_jvp is not None and ev.traceable, f_jvp is None)
        u = max(pl.machine_eps(d) for d in plan.dtypes)
        parts, _ = _measure(problem, u, u <= pl.machine_eps(np.float64), o)
        specs = _output_specs(out_holder["out"])
        source = "hand-written" if f_jvp is not None else "jax.jvp"
        return _report(problem, specs, parts, start, o, source=source,
                       autodiff_name="jax.jvp", noun="tangent rule", mode="jvp",
                       method="central differences of f along each tangent (h, 2h, finer "
                              "where needed)", notes=[f"{words} tangent(s)"])


def _unflat(sp, plan: pl.Plan, flat: np.ndarray):
    """A flat real vector (a point or a direction) as a pytree like the primals: a complex
    leaf rebuilt from its real view, x + iy."""
    leaves = list(sp.leaves)
    for k, i in enumerate(sp.checked):
        a, b = sp.offsets[k], sp.offsets[k + 1]
        leaves[i] = np.reshape(flat[a:b], sp.specs[i].view_shape).astype(plan.dtypes[k])
        if sp.specs[i].is_complex:
            leaves[i] = merge_parts(np, leaves[i])
    return jax.tree_util.tree_unflatten(sp.treedef, leaves)


def _jvp_rule(f, f_jvp, sp, plan, out_holder) -> Callable:
    """flat tangent -> flat tangent output of the rule under test (f_jvp, or jax.jvp of f)."""
    primal_tree = _unflat(sp, plan, plan.theta)

    def rule(t_flat):
        t_tree = _unflat(sp, plan, t_flat)
        if f_jvp is None:
            out, t_out = jax.jvp(f, tuple(primal_tree), tuple(t_tree))
        else:
            res = calls.user_call("f_jvp(primals, tangents)", f_jvp, tuple(primal_tree),
                                  tuple(t_tree))
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                raise InputError(f"f_jvp(primals, tangents) must return (out, tangent_out), as "
                                 f"jax.jvp does; got a {type(res).__name__}.")
            out, t_out = res
        out_holder.setdefault("out", out)
        return np.asarray(flat_output(t_out, np), np.float64)

    return rule


@recorded
def check_hvp(loss: Callable, params, *args, grad: Callable | None = None,
              hvp: Callable | None = None, x64: bool = True, seed: int = 0,
              n_directions: int = N_TANGENTS, mode: str = "auto", eps: float | None = None,
              samples: int = pl.DEFAULT_SAMPLES, memory_budget: int | None = None,
              progress: bool | None = None) -> Report:
    """Checks Hessian-vector products: the counterpart of torch's gradgradcheck.

    The reference is finite differences of the gradient function along v (`grad`, or
    jax.grad(loss) when grad is None), for directions chosen by `mode`: "auto" (default)
    `n_directions` seeded random ones plus every basis direction of leaves with at most 16
    entries; "full" every basis direction (the whole Hessian); "sample" `samples` basis
    directions per leaf; "directional" random ones only.

    Args:
      loss: `loss(params, *args) -> scalar`.
      params: any pytree; its float leaves are differentiated.
      grad: the gradient function `grad(params, *args)` whose derivative is taken; None:
        jax.grad(loss).
      hvp: `hvp(params, v, *args) -> H·v` shaped like params. None: jax's own product, the
        derivative of the gradient function along v: forward-over-reverse, or
        reverse-over-reverse where forward mode fails (a custom_vjp rule in the loss).
      eps, memory_budget, progress: as for check_grad.

    Returns:
      A Report whose leaves are the params' leaves.

    >>> import jax.numpy as jnp, numpy as np, jgc
    >>> loss = lambda p: jnp.sum(p["w"] ** 3)
    >>> jgc.check_hvp(loss, {"w": np.array([1.0, 2.0])},
    ...               hvp=lambda p, v: {"w": 6 * p["w"] * v["w"]}).ok
    True
    """
    start = time.perf_counter()
    calls.require_function(loss)
    with precision(x64):
        o = make_options(x64=x64, mode=mode, eps=eps, samples=samples,
                         memory_budget=memory_budget, progress=progress, seed=seed)
        refuse_unusable(params=params, args=args)
        sp = split_checked(params)
        _refuse_complex(sp)
        plan = pl.make_plan(sp, mode=Mode.FULL, x64=x64, eps=eps, samples=0, seed=seed)
        gfun = grad if grad is not None else jax.grad(loss)
        ev = make_evaluator(gfun, sp, plan.theta, plan.dtypes, args, vector=True,
                            memory_budget=o.memory_budget, progress=progress_factory(progress))
        directions, words = _directions(sp, o.mode, seed, n_directions, samples,
                                        BASIS_MAX)
        rule = _hvp_rule(hvp, sp, plan, ev, params, args)
        problem = _Problem(ev, sp, plan, directions, True, rule, True,
                           hvp is not None and ev.traceable, hvp is None)
        u = max(pl.machine_eps(d) for d in plan.dtypes)
        parts, _ = _measure(problem, u, u <= pl.machine_eps(np.float64), o)
        source = "hand-written" if hvp is not None else "jax's H·v"
        return _report(problem, list(sp.specs), parts, start, o, source=source,
                       autodiff_name="jax's H·v", noun="Hessian-vector product", mode="hvp",
                       method="central differences of the gradient along v (h, 2h, finer "
                              "where needed)", notes=[f"{len(directions)} directions: {words}"])


def _refuse_complex(sp) -> None:
    bad = sp.complex_paths()
    if bad:
        raise InputError(
            f"check_hvp does not take complex parameters yet ({listing(bad, 5)}): a "
            "Hessian-vector product over complex entries has no single convention (holomorphic "
            "or real-view). Split each into real and imaginary parts, e.g. params = {'re': "
            "z.real, 'im': z.imag} with z = re + 1j * im inside the loss, or check the "
            "gradient itself with check_grad, which takes complex parameters.")


def _hvp_rule(hvp, sp, plan, ev, params, args) -> Callable:
    """flat v -> flat H·v of the rule under test (hvp, or jax's own product)."""
    p_tree = _unflat(sp, plan, plan.theta)

    def rule(v_flat):
        if hvp is None:
            out, why = calls.autodiff_jvp(ev, v_flat[None], hessian=True)
            if out is None:
                raise InputError(f"hvp=None checks jax's Hessian-vector product, but {why}. "
                                 "Pass your hand-written product as hvp=.")
            return out[0]
        hv = calls.user_call("hvp(params, v, *args)", hvp, p_tree,
                             _unflat(sp, plan, v_flat), *args)
        return np.concatenate([a.ravel() for a in match_gradient(hv, sp, params,
                                                                 "hvp(params, v, *args)")])

    return rule
