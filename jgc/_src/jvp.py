"""Forward-mode rules and second derivatives: `check_jvp` and `check_hvp`.

Both compare a directional derivative of a vector-valued function F (the outputs of f, or the
gradient of a loss) along a tangent t with finite differences of F along t:

    (F(x + h t) - F(x - h t)) / 2h  ~  J t        for every output element at once.

Each output element is an "entry" with its own error bar, from the same error model as
check_grad (estimate.py): the noise of each element is measured (ECnoise along t), truncation
and kinks come from stencils at h, 2h, h/4 and h/8. All stencils cost only two evaluations of F
each, whatever the number of outputs, so every element gets all of them.

Steps are exact. The step h is a power of two (about u**(1/3) times the primals' scale); the
perturbed points are x + d+ and x - d- with d+ = fl(x + h t) - x and d- = x - fl(x - h t); the
finite difference then estimates J (d+ + d-) / 2h exactly. When jgc draws the tangent itself it
uses t = (d+ + d-) / 2h, so the rule is evaluated along exactly the direction measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src import diagnose as dg
from jgc._src import estimate as es
from jgc._src import plan as pl
from jgc._src.check import _validate_callable, precision
from jgc._src.report import Report
from jgc._src.tree import InputError, flatten, match_gradient, split, tree_pformat

N_TANGENTS = 2  # seeded random tangents when none are given
BASIS_MAX = 16  # check_hvp also probes every basis direction of leaves up to this size
PROBE_STEPS = np.arange(9, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class _Flat:
    """A function of the flat vector of checked primals, returning a flat output vector."""

    fn: Callable  # theta (n,) -> out (m,)
    jittable: bool


def _flat_function(f: Callable, sp, dtypes, to_args: Callable) -> _Flat:
    def call(theta, xp):
        leaves = list(sp.leaves)
        for k, i in enumerate(sp.checked):
            a, b = sp.offsets[k], sp.offsets[k + 1]
            leaves[i] = xp.reshape(theta[a:b], sp.specs[i].shape).astype(dtypes[k])
        out = f(*to_args(jax.tree_util.tree_unflatten(sp.treedef, leaves)))
        return xp.concatenate([xp.ravel(xp.asarray(o)) for o in jax.tree_util.tree_leaves(out)]
                              or [xp.zeros(0)])

    try:
        jitted = jax.jit(jax.vmap(lambda t: call(t, jnp)))
        jitted.lower(jax.ShapeDtypeStruct((1, sp.n), np.result_type(*dtypes)))
        return _Flat(lambda rows: np.asarray(jitted(rows)), True)
    except Exception:  # noqa: BLE001 - not traceable: evaluate row by row on the host
        return _Flat(lambda rows: np.stack([np.asarray(call(np.asarray(r), np), np.float64)
                                            for r in rows]), False)


def _exact_steps(theta, dtypes, sp, direction, h):
    """d+ and d- for x -> x +- h t, exact in each leaf's dtype."""
    plus, minus = np.empty_like(theta), np.empty_like(theta)
    for k in range(len(sp.checked)):
        a, b = sp.offsets[k], sp.offsets[k + 1]
        x = theta[a:b].astype(dtypes[k])
        step = (h * direction[a:b]).astype(dtypes[k])
        with np.errstate(over="ignore"):
            plus[a:b] = (x + step) - x
            minus[a:b] = x - (x - step)
    return plus, minus


def _power_of_two_step(theta: np.ndarray, u: float, scale: float = 1.0) -> float:
    """A power of two near u**(1/3) times the primals' typical magnitude (see plan.py)."""
    typical = max(1.0, float(np.median(np.abs(theta))) if theta.size else 1.0)
    return 2.0 ** math.floor(math.log2(u ** (1 / 3) * typical * scale))


def directional_differences(F: _Flat, theta, dtypes, sp, direction, u, float64):
    """Finite differences of F along `direction`, every element with the full error model.

    Returns (ErrorModel, effective tangent (d+ + d-) / 2h, F(theta), evaluations).
    """
    h = _power_of_two_step(theta, u)
    rows, spans = [theta], []
    for scale in es.SCALES[:es.FINER + 1]:  # h, 2h, 4h and the first refinement level
        p, m = _exact_steps(theta, dtypes, sp, direction, h * scale)
        rows += [theta + p, theta - m]
        spans.append((p, m))
    # The noise of every element along the tangent: 9 equally spaced, exact points.
    t_probe = 2.0 ** math.floor(math.log2(u ** 0.5 * max(1.0, float(np.max(np.abs(theta)))
                                                          if theta.size else 1.0)))
    probe_dir = np.where(direction >= 0, 1.0, -1.0) * (direction != 0)
    rows += [theta + j * t_probe * probe_dir for j in PROBE_STEPS]
    values = F.fn(np.stack(rows))
    f0 = values[0]
    sigma_rows = values[-len(PROBE_STEPS):]
    sigma = np.array([es.ecnoise(sigma_rows[:, e]) or np.nan for e in range(f0.size)])
    sigma = np.where(np.isnan(sigma), 0.0, sigma) if np.isfinite(sigma).any() else None
    m = f0.size
    d = es.differences(0.0, m, sigma, u, float64)
    everywhere = np.ones(m, bool)
    for s, scale in enumerate(es.SCALES[:es.FINER + 1]):
        fp, fm = values[1 + 2 * s], values[2 + 2 * s]
        # Per element: F's value at x plays f0's role (the one-sided slopes and |f|). The step
        # is h·scale exactly, so D estimates J (d+ + d-) / 2h: the effective tangent.
        d = es.with_stencil(d, s, everywhere, fp, fm, h * scale, h * scale, f0=f0)
    model = es.error_model(d)
    p1, m1 = spans[0]
    return model, (p1 + m1) / (2 * h), f0, len(rows)


def _random_tangent(seed: int, j: int, theta: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([seed, j])
    return rng.standard_normal(theta.size)


def _report_outputs(out_tree, source: str, checked: list[np.ndarray],
                    autodiff: list[np.ndarray] | None, models, start, n_evals, x64,
                    method_text: str, mode: str, notes, autodiff_name: str, noun: str,
                    root: str = "<out>") -> Report:
    """One LeafReport per output leaf, entries over all tangents, through the usual stages."""
    pairs, _ = flatten(out_tree)
    sizes = [0 if leaf is None else int(np.size(leaf)) for _, leaf in pairs]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    leaves, agrees = [], {}
    zero = es.zero_bound(checked)
    ad_zero = 0.0 if autodiff is None else es.zero_bound(autodiff)
    for o, (path, leaf) in enumerate(pairs):
        sl = slice(offsets[o], offsets[o + 1])
        if leaf is None:  # a skipped (non-float) parameter
            leaves.append(dg.LeafReport(path, (), None, 0, "skipped", reason="not a float"))
            continue
        shape = tuple(np.shape(leaf))
        dtype = str(np.asarray(leaf).dtype) if leaf is not None else None
        path = path or root
        spec = dataclasses.replace(split(np.zeros(shape)).specs[0], path=path, dtype=dtype)
        parts = []
        for model, g, g_ad in zip(models, checked, autodiff or [None] * len(models)):
            g_round = es.rounding(g[sl], pl.machine_eps(np.float64 if x64 else np.float32),
                                  float(np.max(np.abs(g[sl]))) if g[sl].size else 0.0)
            cmp = es.compare(g[sl], _slice_model(model, sl), value_error=g_round)
            cmp_ad = None if g_ad is None else es.compare(g_ad[sl], _slice_model(model, sl),
                                                          value_error=g_round)
            tol = es.tolerance(model.error[sl] + g_round, model.value[sl])
            parts.append((model.value[sl], tol, g[sl], cmp, None if g_ad is None else g_ad[sl],
                          cmp_ad, model.kink[sl]))
        cat = lambda i, parts=parts: np.concatenate([p[i] for p in parts])  # noqa: E731
        cmp = es.Comparison(*(np.concatenate([getattr(p[3], f) for p in parts])
                              for f in ("status", "abs_error", "rel_error")))
        cmp_ad = None if autodiff is None else es.Comparison(
            *(np.concatenate([getattr(p[5], f) for p in parts])
              for f in ("status", "abs_error", "rel_error")))
        g_ad = None if autodiff is None else cat(4)
        agree = None if g_ad is None else np.abs(cat(2) - g_ad) <= cat(1)
        entries = np.tile(np.arange(sizes[o]), len(parts))
        data = dg.LeafData(spec, entries, np.zeros(len(entries)), cat(0), cat(1), cat(2), cmp,
                           g_ad, cmp_ad, agree, kink=cat(6), zero_bound=zero,
                           autodiff_zero_bound=ad_zero)
        leaves.append(dg.leaf_report(data, full=False))
        agrees[path] = dg.agrees_with_autodiff(data)
    verdict, text = dg.diagnose(leaves, agrees, source=source,
                                has_autodiff=autodiff is not None,
                                autodiff_why="f is not traceable by JAX", batch=None,
                                autodiff=autodiff_name, noun=noun)
    g_all = np.concatenate(checked)
    num_all = np.concatenate([m.value for m in models])
    den = np.linalg.norm(g_all) + np.linalg.norm(num_all)
    return Report(ok=verdict == "ok", verdict=verdict, leaves=tuple(leaves),
                  global_rel_error=float(np.linalg.norm(g_all - num_all) / den) if den else 0.0,
                  diagnosis=text, checked_source=source,
                  precision="float64 (x64)" if x64 else "float32", method=method_text,
                  mode=mode, step="h = 2**k ≈ u**(1/3)·scale (exact)", n_params=int(offsets[-1]),
                  n_checked=len(g_all), n_evaluations=n_evals,
                  seconds=time.perf_counter() - start, notes=tuple(notes),
                  autodiff_name=autodiff_name, noun=noun)


def _slice_model(m: es.ErrorModel, sl: slice) -> es.ErrorModel:
    return es.ErrorModel(*(None if getattr(m, f.name) is None else getattr(m, f.name)[sl]
                           for f in dataclasses.fields(m)))


def _setup(primals_tree, x64):
    sp = split(primals_tree)
    if not sp.checked:
        raise InputError(f"the primals have no floating-point leaves to differentiate: "
                         f"{tree_pformat(primals_tree)}.")
    dtypes = tuple(pl.eval_dtype(s.dtype, x64) for s in sp.checked_specs())
    theta = np.concatenate([np.asarray(sp.leaves[i], np.float64).ravel() for i in sp.checked])
    u = max(pl.machine_eps(d) for d in dtypes)
    return sp, dtypes, theta, u


def _unflat(sp, dtypes, flat, xp=np):
    leaves = list(sp.leaves)
    for k, i in enumerate(sp.checked):
        a, b = sp.offsets[k], sp.offsets[k + 1]
        leaves[i] = xp.asarray(np.reshape(flat[a:b], sp.specs[i].shape)).astype(dtypes[k])
    return jax.tree_util.tree_unflatten(sp.treedef, leaves)


def _flat_out(out) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(out)
    return (np.concatenate([np.asarray(o, np.float64).ravel() for o in leaves])
            if leaves else np.zeros(0))


def check_jvp(f: Callable, f_jvp: Callable | None, primals, tangents=None, *,
              x64: bool = True, seed: int = 0, n_tangents: int = N_TANGENTS) -> Report:
    """Checks a forward-mode rule of `f` against finite differences of f along the tangents.

    Args:
      f: `f(*primals) -> out` (an array or a pytree of arrays), JAX or NumPy.
      f_jvp: `f_jvp(primals, tangents) -> (out, tangent_out)`, as `jax.jvp` returns. With None,
        `jax.jvp(f)` is checked: how a `jax.custom_jvp` rule is tested.
      primals: a tuple of f's inputs (a single array is a 1-tuple).
      tangents: a tuple shaped like primals, or None for `n_tangents` seeded random ones.
      x64: evaluate in float64 (restored afterwards).

    Returns:
      A Report whose leaves are the output's leaves (paths as `keystr` of the output pytree),
      each entry an output element; entries are pooled over the tangents.

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
    _validate_callable(f, "f")
    if f_jvp is not None and not callable(f_jvp):
        raise InputError("f_jvp must be a function f_jvp(primals, tangents) -> (out, "
                         "tangent_out), or None to check jax.jvp of f.")
    primals = tuple(primals) if isinstance(primals, (tuple, list)) else (primals,)
    with precision(x64):
        sp, dtypes, theta, u = _setup(primals, x64)
        F = _flat_function(f, sp, dtypes, lambda p: p)
        if tangents is not None:
            t_flat = np.concatenate([a.ravel() for a in match_gradient(
                tuple(tangents) if isinstance(tangents, (tuple, list)) else (tangents,), sp,
                primals, "tangents")])
            directions = [t_flat.astype(np.float64).ravel()]
        else:
            directions = [_random_tangent(seed, j, theta) for j in range(n_tangents)]
        models, checked, auto, n_evals, out_tree = [], [], [], 0, None
        jax_rule = None
        if F.jittable:
            jax_rule = lambda p, t: jax.jvp(f, p, t)  # noqa: E731
        if f_jvp is None and jax_rule is None:
            raise InputError("f_jvp=None asks jgc to check jax.jvp of f, but JAX cannot trace "
                             "f. Pass your forward-mode rule as f_jvp.")
        rule = f_jvp if f_jvp is not None else jax_rule
        for direction in directions:
            model, t_eff, f0, n = directional_differences(F, theta, dtypes, sp, direction, u,
                                                          u <= pl.machine_eps(np.float64))
            t_use = t_eff if tangents is None else direction
            p_tree = _unflat(sp, dtypes, theta)
            t_tree = _unflat(sp, dtypes, t_use)
            out, t_out = _call_rule(rule, p_tree, t_tree, "f_jvp(primals, tangents)")
            out_tree = out
            checked.append(_flat_out(t_out))
            if f_jvp is not None and jax_rule is not None:
                auto.append(_flat_out(jax_rule(p_tree, t_tree)[1]))
            models.append(model)
            n_evals += n
            _check_sizes(checked[-1], f0, out)
        source = "hand-written" if f_jvp is not None else "jax.jvp"
        return _report_outputs(out_tree, source, checked, auto or None, models, start,
                               n_evals, x64, "central differences of f along each tangent (h, "
                               "2h, h/4, h/8)", "jvp", [f"{len(directions)} tangent(s)"
                                                        + (" (seeded)" if tangents is None
                                                           else "")],
                               "jax.jvp", "tangent rule")


def _call_rule(rule, p, t, what):
    try:
        res = rule(tuple(p), tuple(t))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{what} raised {type(e).__name__}: {e}") from e
    if not (isinstance(res, (tuple, list)) and len(res) == 2):
        raise InputError(f"{what} must return (out, tangent_out), as jax.jvp does; got a "
                         f"{type(res).__name__}.")
    return res


def _check_sizes(checked: np.ndarray, f0: np.ndarray, out) -> None:
    if checked.size != f0.size:
        raise InputError(f"the tangent output has {checked.size} entries but f's output has "
                         f"{f0.size}: tangent_out must be shaped like f(*primals), "
                         f"{tree_pformat(out)}.")


@functools.lru_cache(maxsize=64)
def _grad_of(loss: Callable) -> Callable:
    return jax.grad(loss)


def check_hvp(loss: Callable, params, *args, grad: Callable | None = None,
              hvp: Callable | None = None, x64: bool = True, seed: int = 0,
              n_directions: int = N_TANGENTS) -> Report:
    """Checks Hessian-vector products: the counterpart of torch's gradgradcheck.

    The reference is finite differences of the gradient function along v (`grad`, or
    jax.grad(loss) when grad is None), for seeded random directions v plus every basis direction
    of leaves with at most 16 entries.

    Args:
      loss: `loss(params, *args) -> scalar`.
      params: any pytree; its float leaves are differentiated.
      grad: the gradient function `grad(params, *args)` whose derivative is taken; None:
        jax.grad(loss).
      hvp: `hvp(params, v, *args) -> H·v` shaped like params. None: jax's own product, the
        derivative of the gradient function along v: forward-over-reverse, or
        reverse-over-reverse where forward mode fails (a custom_vjp rule in the loss).

    Returns:
      A Report whose leaves are the params' leaves.

    >>> import jax.numpy as jnp, numpy as np, jgc
    >>> loss = lambda p: jnp.sum(p["w"] ** 3)
    >>> jgc.check_hvp(loss, {"w": np.array([1.0, 2.0])},
    ...               hvp=lambda p, v: {"w": 6 * p["w"] * v["w"]}).ok
    True
    """
    start = time.perf_counter()
    _validate_callable(loss)
    with precision(x64):
        sp, dtypes, theta, u = _setup(params, x64)
        gfun = grad if grad is not None else _grad_of(loss)
        F = _flat_function(lambda p: gfun(p, *args), sp, dtypes, lambda p: (p,))
        directions = [_random_tangent(seed, j, theta) for j in range(n_directions)]
        for k, spec in enumerate(sp.checked_specs()):
            if 0 < spec.size <= BASIS_MAX:
                for e in range(spec.size):
                    v = np.zeros(sp.n)
                    v[sp.offsets[k] + e] = 1.0
                    directions.append(v)
        jax_hvp = _jax_hvp(gfun, args)
        models, checked, auto, n_evals = [], [], [], 0
        for v in directions:
            model, v_eff, f0, n = directional_differences(F, theta, dtypes, sp, v, u,
                                                          u <= pl.machine_eps(np.float64))
            p_tree, v_tree = _unflat(sp, dtypes, theta), _unflat(sp, dtypes, v_eff)
            if hvp is not None:
                try:
                    hv = hvp(p_tree, v_tree, *args)
                except Exception as e:
                    raise InputError(f"hvp(params, v, *args) raised {type(e).__name__}: "
                                     f"{e}") from e
                checked.append(np.concatenate([a.ravel() for a in match_gradient(
                    hv, sp, params, "hvp(params, v, *args)")]))
                auto.append(_flat_out(jax_hvp(p_tree, v_tree)))
            else:
                checked.append(_flat_out(jax_hvp(p_tree, v_tree)))
            models.append(model)
            n_evals += n
        leaves = [None] * len(sp.specs)
        for k, i in enumerate(sp.checked):
            leaves[i] = np.reshape(theta[sp.offsets[k]:sp.offsets[k + 1]], sp.specs[i].shape)
        out_tree = jax.tree_util.tree_unflatten(sp.treedef, leaves)
        source = "hand-written" if hvp is not None else "jax's H·v"  # matches autodiff_name
        report = _report_outputs(out_tree, source, checked, auto or None, models, start,
                                 n_evals, x64, "central differences of the gradient along v "
                                 "(h, 2h, h/4, h/8)", "hvp",
                                 [f"{len(directions)} directions: {n_directions} seeded random, "
                                  f"{len(directions) - n_directions} basis"],
                                 "jax's H·v", "Hessian-vector product", root="<params>")
        return report


def _jax_hvp(gfun, args):
    """jax's H·v: forward-over-reverse, or reverse-over-reverse where jvp fails."""
    def g(p):
        return gfun(p, *args)

    def fwd(p, v):
        return jax.jvp(g, (p,), (v,))[1]

    def rev(p, v):
        return jax.grad(lambda q: sum(jnp.vdot(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(g(q)), jax.tree_util.tree_leaves(v))))(p)

    fwd_jit, rev_jit, forward_failed = jax.jit(fwd), jax.jit(rev), []

    def run(p, v):
        if not forward_failed:
            try:
                return fwd_jit(p, v)
            except Exception:  # noqa: BLE001 - "can't apply forward-mode autodiff (jvp) to a
                forward_failed.append(True)  # custom_vjp function": reverse-over-reverse
        return rev_jit(p, v)

    return run
