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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.evaluators import autodiff as ad
from jgc._src.evaluators import calls
from jgc._src.report import explain
from jgc._src.report.report import Report
from jgc._src.report.vocab import Mode, Verdict
from jgc._src.stages import compare as cp
from jgc._src.stages import diagnose as dg
from jgc._src.stages import differences as dq
from jgc._src.stages import errormodel as em
from jgc._src.stages import estimate as es
from jgc._src.stages import plan as pl
from jgc._src.stages.perturbations import Tangents
from jgc._src.stages.prepare import Check, Subject, precision, prepare
from jgc._src.stages.split import (
    InputError,
    LeafSpec,
    flat_output,
    flatten,
    listing,
    match_gradient,
    merge_parts,
    split_checked,
)
from jgc._src.surfaces.options import count_option, make_options
from jgc._src.surfaces.recording import recorded

N_TANGENTS = 2  # seeded random tangents when none are given
BASIS_MAX = 16  # check_hvp also probes every basis direction of leaves up to this size
GROUP = 64  # directions evaluated per batch (each a row of the perturbation vectors)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """A vector function of the parameters (the carrier's), the directions to probe it along,
    and the rule."""

    check: Check
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


def _measure(problem: _Problem) -> list[cp.Compared]:
    """Every direction, in groups: the error model, the checked and jax's derivatives."""
    check = problem.check
    ev, plan, o, u = check.ev, check.plan, check.options, check.u
    parts = []
    schedule = es.Schedule(everywhere=True, refine=o.refine, rtol=o.rtol, atol=o.atol)
    for a in range(0, len(problem.directions), GROUP):
        T = problem.directions[a:a + GROUP]
        h = np.array([pl.tangent_step(plan, t) for t in T])
        probes = Tangents(ev, plan.theta.astype(ev.dtype), T, h, check.f0)
        used = probes.effective if problem.effective else T
        checked = np.concatenate([problem.rule(t) for t in used])
        _require_size(checked, len(T) * probes.m)
        g_round = np.concatenate([cp.leaf_rounding(c) for c in checked.reshape(len(T), -1)])
        autodiff = None
        if problem.use_autodiff:
            autodiff, _ = ad.autodiff_jvp(ev, used, hessian=problem.hessian)
            autodiff = None if autodiff is None else autodiff.ravel()
        d = dq.differences(0.0, len(checked), probes.noise(u), u, check.float64)
        found = es.derivative(probes.evaluate, d, checked, g_round, autodiff, g_round,
                              schedule=schedule,
                              checked_is_autodiff=problem.checked_is_autodiff)
        parts.append(cp.compared(found.model, found.cmp, found.cmp_ad, checked, g_round,
                                 autodiff, g_round, o.rtol, o.atol))
    return parts


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
    bounds = cp.Bounds(None if o.user_tolerance else em.zero_bound([c.g]),
                       0.0 if c.g_ad is None else em.zero_bound([c.g_ad]))
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


def _report(problem: _Problem, specs, parts, *, source, autodiff_name, noun, mode, method,
            notes) -> Report:
    check = problem.check
    leaves, agrees, c = _leaves(specs, parts, check.options)
    verdict, text = explain.diagnosis(
        leaves, agrees, source=source, has_autodiff=c.g_ad is not None or source == autodiff_name,
        autodiff_why="f is not traceable by JAX", batch=None, autodiff=autodiff_name, noun=noun,
        float64=check.float64)
    header = check.header(source, method, mode, autodiff_name, noun,
                          n_params=len(c.g) // max(len(problem.directions), 1))
    return cp.build_report(leaves, Verdict(verdict), text, header, n_checked=len(c.g),
                           n_evaluations=check.ev.n_evaluations, start=check.start,
                           notes=(*check.notes, *notes),
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
      memory_budget: as for check_grad.
      progress: as for check_grad.

    Returns:
      A Report whose leaves are the output's leaves (paths as `keystr` of the output pytree),
      each entry an output element; entries are pooled over the directions.

    Examples:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_jvp
      ... def f(x):
      ...     return jnp.sin(x)
      >>> f.defjvp(lambda p, t: (f(p[0]), 2 * jnp.cos(p[0]) * t[0]))  # wrong: the 2
      <...>
      >>> jgc.check_jvp(f, None, (jnp.linspace(0.1, 1, 4),)).ok
      False
    """
    calls.require_function(f, "f", "(*primals) -> out", "check_jvp(f, f_jvp, primals, ...)")
    if f_jvp is not None and not callable(f_jvp):
        raise InputError("f_jvp must be a function f_jvp(primals, tangents) -> (out, "
                         "tangent_out), or None to check jax.jvp of f.")
    primals = tuple(primals) if isinstance(primals, (tuple, list)) else (primals,)
    if tangents is not None and not isinstance(tangents, (tuple, list)):
        tangents = (tangents,)
    with precision(x64) as prec:
        o = make_options(x64=x64, mode=mode, eps=eps, samples=samples,
                         memory_budget=memory_budget, progress=progress, seed=seed)
        n_random = 0 if tangents is not None else count_option("n_tangents", n_tangents,
                                                                o.mode, "tangents")
        subject = Subject(lambda p: f(*p), primals, vector=True, name="primals",
                          fn_name="f(*primals)",
                          directions=() if tangents is None else (("tangents", tuple(tangents)),))
        check = prepare(subject, dataclasses.replace(o, mode=Mode.FULL), prec)
        if isinstance(check, Report):
            return check
        if f_jvp is None and not check.ev.traceable:
            raise InputError("f_jvp=None asks jgc to check jax.jvp of f, but JAX cannot trace "
                             "f. Pass your forward-mode rule as f_jvp.")
        if tangents is not None:
            t = np.concatenate([a.ravel() for a in match_gradient(
                tuple(tangents), check.sp, primals, "tangents", tangent=True)])
            directions, words = t.astype(np.float64)[None], "1 given"
        else:
            directions, words = _directions(check.sp, o.mode, seed, n_random, samples, 0)
            _require_directions(directions, "n_tangents", o.mode)
        out_holder = {}
        rule = _jvp_rule(f, f_jvp, check, out_holder)
        problem = _Problem(check, directions, tangents is None, rule, False,
                           f_jvp is not None and check.ev.traceable, f_jvp is None)
        parts = _measure(problem)
        specs = _output_specs(out_holder["out"])
        source = "hand-written" if f_jvp is not None else "jax.jvp"
        return _report(problem, specs, parts, source=source,
                       autodiff_name="jax.jvp", noun="tangent rule", mode="jvp",
                       method="central differences of f along each tangent (h, 2h, finer "
                              "where needed)", notes=[f"{words} tangent(s)"])


def _require_directions(directions: np.ndarray, option: str, mode: Mode) -> None:
    if len(directions) == 0:
        raise InputError(f"no direction to check: {option}=0 random ones and mode={mode.value!r} "
                         f"adds no basis direction here. Pass {option} >= 1, or mode='full' for "
                         "every basis direction.")


def _real(a: np.ndarray) -> np.ndarray:
    """A rule's flat output as a real floating array, keeping its precision."""
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(np.float64)


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


def _jvp_rule(f, f_jvp, check: Check, out_holder) -> Callable:
    """flat tangent -> flat tangent output of the rule under test (f_jvp, or jax.jvp of f)."""
    sp, plan = check.sp, check.plan
    primal_tree = _unflat(sp, plan, plan.theta)

    def rule(t_flat):
        t_tree = _unflat(sp, plan, t_flat)
        if f_jvp is None:  # jax's own JVP is what is checked; its failure is a refusal
            out, t_out = calls.user_call("jax.jvp(f, primals, tangents)", jax.jvp, f,
                                         tuple(primal_tree), tuple(t_tree))
        else:
            res = calls.user_call("f_jvp(primals, tangents)", f_jvp, tuple(primal_tree),
                                  tuple(t_tree))
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                raise InputError(f"f_jvp(primals, tangents) must return (out, tangent_out), as "
                                 f"jax.jvp does; got a {type(res).__name__}.")
            out, t_out = res
        out_holder.setdefault("out", out)
        # In the rule's own dtype: a float32 rule's rounding enters the error model
        # (leaf_rounding), which float64 would shrink 2**29-fold.
        return _real(np.asarray(flat_output(t_out, np)))

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
      eps: as for check_grad.
      memory_budget: as for check_grad.
      progress: as for check_grad.

    Returns:
      A Report whose leaves are the params' leaves.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, jgc
      >>> loss = lambda p: jnp.sum(p["w"] ** 3)
      >>> jgc.check_hvp(loss, {"w": np.array([1.0, 2.0])},
      ...               hvp=lambda p, v: {"w": 6 * p["w"] * v["w"]}).ok
      True
    """
    calls.require_function(loss)
    if grad is not None:
        calls.require_function(grad, "grad", "(params, *args) -> gradient shaped like params",
                               "check_hvp(loss, params, *args, grad=..., hvp=...)")
    with precision(x64) as prec:
        o = make_options(x64=x64, mode=mode, eps=eps, samples=samples,
                         memory_budget=memory_budget, progress=progress, seed=seed)
        n_random = count_option("n_directions", n_directions, o.mode, "directions")
        sp = split_checked(params)
        _refuse_complex(sp)
        subject = Subject(_checked_gradient(loss, grad, sp), params, args, vector=True,
                          fn_name="the gradient" if grad is None else "grad(params, *args)")
        check = prepare(subject, dataclasses.replace(o, mode=Mode.FULL), prec)
        if isinstance(check, Report):
            return check
        directions, words = _directions(check.sp, o.mode, seed, n_random, samples, BASIS_MAX)
        _require_directions(directions, "n_directions", o.mode)
        rule = _hvp_rule(hvp, check, params, args)
        problem = _Problem(check, directions, True, rule, True,
                           hvp is not None and check.ev.traceable, hvp is None)
        parts = _measure(problem)
        source = "hand-written" if hvp is not None else "jax's H·v"
        return _report(problem, list(check.sp.specs), parts, source=source,
                       autodiff_name="jax's H·v", noun="Hessian-vector product", mode="hvp",
                       method="central differences of the gradient along v (h, 2h, finer "
                              "where needed)", notes=[f"{len(directions)} directions: {words}"])


def _checked_gradient(loss: Callable, grad: Callable | None, sp) -> Callable:
    """The gradient function whose derivative check_hvp takes, over the checked (float) leaves
    only, as a list in their order: jax.grad of the loss with respect to them (int and bool
    leaves are held fixed, as check_grad holds them), or the user's `grad` with its other
    leaves dropped."""
    paths = [s.path for s in sp.checked_specs()]

    def pick(tree):
        by_path = dict(flatten(tree)[0])
        missing = [p for p in paths if p not in by_path or by_path[p] is None]
        if missing:
            raise InputError(f"grad(params, *args) returned no gradient for params"
                             f"{missing[0]}: it must return a pytree shaped like params, as "
                             "jax.grad does.")
        return [by_path[p] for p in paths]

    if grad is not None:
        return lambda params, *args: pick(grad(params, *args))

    def gradient(params, *args):
        pairs, treedef = flatten(params)
        leaves = [x for _, x in pairs]
        where = [i for i, (p, _) in enumerate(pairs) if p in set(paths)]

        def of_checked(xs):
            new = list(leaves)
            for i, x in zip(where, xs):
                new[i] = x
            return loss(jax.tree_util.tree_unflatten(treedef, new), *args)

        return jax.grad(of_checked)([leaves[i] for i in where])

    return gradient


def _refuse_complex(sp) -> None:
    bad = sp.complex_paths()
    if bad:
        raise InputError(
            f"check_hvp does not take complex parameters yet ({listing(bad, 5)}): a "
            "Hessian-vector product over complex entries has no single convention (holomorphic "
            "or real-view). Split each into real and imaginary parts, e.g. params = {'re': "
            "z.real, 'im': z.imag} with z = re + 1j * im inside the loss, or check the "
            "gradient itself with check_grad, which takes complex parameters.")


def _hvp_rule(hvp, check: Check, params, args) -> Callable:
    """flat v -> flat H·v of the rule under test (hvp, or jax's own product)."""
    sp, plan, ev = check.sp, check.plan, check.ev
    args = check.ev.args  # promoted with the parameters under x64
    p_tree = _unflat(sp, plan, plan.theta)

    def rule(v_flat):
        if hvp is None:
            out, why = ad.autodiff_jvp(ev, v_flat[None], hessian=True)
            if out is None:
                raise InputError(f"hvp=None checks jax's Hessian-vector product, but {why}. "
                                 "Pass your hand-written product as hvp=.")
            return out[0]
        hv = calls.user_call("hvp(params, v, *args)", hvp, p_tree,
                             _unflat(sp, plan, v_flat), *args)
        return np.concatenate([a.ravel() for a in match_gradient(hv, sp, params,
                                                                 "hvp(params, v, *args)")])

    return rule
