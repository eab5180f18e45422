"""The pipeline, end to end: split -> plan -> evaluate -> estimate -> compare -> diagnose."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jgc._src import diagnose as dg
from jgc._src import directional as dr
from jgc._src import estimate as es
from jgc._src import plan as pl
from jgc._src.evaluate import Deadline, Evaluator, TooSlow
from jgc._src.inputs import in_precision, precision, promote_args, refuse_unusable
from jgc._src.progress import Progress, enabled
from jgc._src.report import LeafReport, Report
from jgc._src.tree import ArrayTree, InputError, Split, match_gradient, split

Loss = Callable[..., Any]  # loss(params, *args) -> scalar


def _batch_size(args) -> int | None:
    """The leading dimension of the first array argument: the batch size m of (X, Y) losses."""
    for leaf in jax.tree_util.tree_leaves(args):
        shape = getattr(leaf, "shape", ())
        if len(shape) >= 1:
            return int(shape[0])
    return None


def _restricted(sp: Split, plan: pl.Plan, leaves: list[np.ndarray]) -> np.ndarray:
    """Concatenates the planned entries of each checked leaf (arrays shaped like the leaves)."""
    parts = [np.asarray(a, np.float64).ravel()[e] for a, e in zip(leaves, plan.entries)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _flat_to_leaves(sp: Split, flat: np.ndarray) -> list[np.ndarray]:
    return [flat[sp.offsets[k]:sp.offsets[k + 1]].reshape(sp.specs[i].shape)
            for k, i in enumerate(sp.checked)]


def _global_indices(sp: Split, plan: pl.Plan) -> np.ndarray:
    parts = [sp.offsets[k] + e for k, e in enumerate(plan.entries)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _all_steps(sp: Split, plan: pl.Plan, scale: float, method: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    pairs = [pl.steps(plan, sp, k, scale, method) for k in range(len(sp.checked))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def _validate_callable(loss, name="loss"):
    if not callable(loss):
        raise InputError(f"{name} must be a function {name}(params, *args) -> scalar, but got a "
                         f"{type(loss).__name__}. Did you pass the arguments in the wrong order? "
                         "The signature is check_grad(loss, params, *args, grad=...).")


def _split_checked(params) -> Split:
    sp = split(params)
    if not sp.checked:
        found = ", ".join(f"{s.path or '<params>'}: {s.reason}" for s in sp.specs)
        raise InputError(
            "params has no floating-point leaves to check"
            + (f" (its leaves: {found})" if sp.specs else " (it is empty)")
            + ". Pass the trainable parameters as float arrays, e.g. "
            "{'W': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}.")
    if sp.n == 0:
        empty = ", ".join(f"{s.path or '<params>'} (shape {s.shape})" for s in sp.checked_specs())
        raise InputError(
            f"params has no entries to check: every floating-point leaf is empty ({empty}). A "
            "check of zero entries would verify nothing. Pass parameters with at least one "
            "entry.")
    return sp


def _measure_noise(ev: Evaluator, sp: Split, plan: pl.Plan) -> float | None:
    """The loss's noise level (standard deviation of one evaluation), or None if unmeasurable.

    The largest of the per-leaf ECnoise estimates: the noise a perturbation sees depends on how
    much computation the perturbed entry feeds, and the largest is the safe choice. A probe
    whose values are a staircase (the loss rounds its inputs more coarsely than the probe's
    spacing) is repeated at a wider spacing, up to MAX_WIDEN times.
    """
    limit = pl.DIRECTIONAL_NOISE_PROBES if plan.mode == "directional" else pl.MAX_NOISE_PROBES
    eps = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))
    sigmas, again = [], None
    for widen in range(MAX_WIDEN + 1):
        probes = pl.noise_probes(plan, sp, limit, widen)
        if again is not None:  # only the probes to repeat (by entry), if they are wider now
            probes = [(i, st) for i, st in probes
                      if i in again and np.max(np.abs(st)) > again[i]]
        if not probes:
            break
        values = _probe_values(ev, sp, plan, probes)
        sigmas += [x for x in (es.ecnoise(v, eps) for v in values) if x is not None]
        # Flat or a staircase: the loss rounds its inputs more coarsely than the spacing.
        again = {i: float(np.max(np.abs(st))) for (i, st), v in zip(probes, values)
                 if es.staircase(v)}
    return max(sigmas) if sigmas else None


# A loss that rounds float64 inputs to float32 needs probes ~2**16 wider than float64's spacing
# (sqrt(eps64) = 1.5e-8, against float32's resolution 6e-8): two widenings by 2**8.
MAX_WIDEN = 2


def _variation(f0: float, f_scale: float, theta: np.ndarray, leaves) -> float:
    """The scale on which the loss varies, for turning its measured noise into a relative one.

    The step rule assumes the third derivative is about the loss's own size (plan.py). A loss
    that cancels to ~0 (a sum of mixed-sign terms) still varies, on the scale of its
    first-order change |g_j| max(1, |theta_j|): the larger of the two is used, so that a
    near-zero loss does not read as noisy.
    """
    g = np.abs(np.concatenate([np.asarray(a, np.float64).ravel() for a in leaves]))
    first_order = g * np.maximum(1.0, np.abs(theta))
    finite = first_order[np.isfinite(first_order)]
    return max(abs(f0), f_scale, float(finite.max()) if finite.size else 0.0) or 1.0


def _probe_values(ev: Evaluator, sp: Split, plan: pl.Plan, probes) -> list[np.ndarray]:
    if plan.mode == "directional":
        # Through the per-leaf direction batches that directional mode compiles anyway: one
        # step vector t·e_j on the device, and multiples 0, ±1, ..., of it.
        values = []
        for i, st in probes:
            k = int(np.searchsorted(sp.offsets, i, side="right")) - 1
            j = i - sp.offsets[k]
            t = float(np.max(np.abs(st)))
            vec = np.zeros((1, sp.offsets[k + 1] - sp.offsets[k]))
            vec[0, j] = t
            values.append(ev.along(k, ev.vectors(vec), np.zeros(len(st)), st / t,
                                   np.full(len(st), j), np.full(len(st), j + 1)))
        return values
    index = np.concatenate([np.full(len(st), i) for i, st in probes])
    return np.split(ev.perturbed(index, np.concatenate([st for _, st in probes])),
                    len(probes))


def _coordinates(ev: Evaluator, sp: Split, plan: pl.Plan, index: np.ndarray,
                 deadline: Deadline | None = None):
    """The probes of a coordinate check, for es.derivative: entry index[j] moved by its exact
    steps, both sides in one batch. A `deadline` times the first stencil (mode="auto")."""
    def evaluate(s: int, where: np.ndarray):
        # The fine stencils look closer than the central step, whatever the method's own step.
        hp, hm = _all_steps(sp, plan, es.SCALES[s], "central" if s >= es.FINE else None)
        hp, hm, idx = hp[where], hm[where], index[where]
        values = ev.perturbed(np.concatenate([idx, idx]), np.concatenate([hp, -hm]),
                              deadline=deadline if s == 0 else None)
        k = len(idx)
        _check_finite(sp, idx, values, k)
        return values[:k], values[k:], hp, hm, None

    return evaluate


def _stencil(ev: Evaluator, sp: Split, plan: pl.Plan, d: es.Differences, s: int,
             where: np.ndarray, index: np.ndarray) -> es.Differences:
    """Evaluates stencil s (step multiplier SCALES[s]) at the entries `where`, in one batch."""
    if not where.any():
        return d
    fp, fm, hp, hm, _ = _coordinates(ev, sp, plan, index)(s, where)
    return es.with_stencil(d, s, where, fp, fm, hp, hm)


def _run(loss: Loss, params: ArrayTree, args: tuple, *, grad, x64: bool, mode: str,
         eps: float | None, rtol: float | None, atol: float | None, samples: int, seed: int,
         method: str = "central", f_scale: float = 0.0, source_name: str = "hand-written",
         memory_budget: int | None = None, progress: bool | None = None,
         has_aux: bool = False, effective_x64: bool = True) -> Report:
    """The whole check. Pure: builds copies, never touches the user's arrays or config.

    `effective_x64` is the x64 flag the check runs under (from `inputs.precision`).
    """
    start = time.perf_counter()
    _validate_callable(loss)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not (np.isfinite(v) and v >= 0):
            raise InputError(f"{name}={v!r}: expected a non-negative number, or None to use the "
                             "error model.")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(
            memory_budget, (int, float, np.integer, np.floating))
            or not np.isfinite(memory_budget) or memory_budget < 1):
        raise InputError(f"memory_budget={memory_budget!r}: expected a positive number of bytes "
                         "for one batch of perturbed evaluations (e.g. 2**30 for 1 GiB), or None "
                         "for the default (a quarter of the available memory, 256 MiB to "
                         "1 GiB).")
    refuse_unusable(params=params, args=args, grad=grad)
    sp = _split_checked(params)
    plan = pl.make_plan(sp, mode=mode, x64=x64, eps=eps, samples=samples, seed=seed,
                        method=method)
    notes: list[str] = []
    half = [s.path or "<params>" for s in sp.checked_specs() if s.dtype in pl.HALF]
    if half and not x64:
        notes.append(f"{', '.join(half)} {'is' if len(half) == 1 else 'are'} half precision: "
                     "evaluated in float32, since differences of a half-precision loss are "
                     "mostly rounding noise (~3 digits)")
    args, promoted = promote_args(args, x64)
    if promoted:
        notes.append(f"x64: floating-point arguments were promoted to float64 with the "
                     f"parameters ({', '.join(promoted[:4])}"
                     f"{', ...' if len(promoted) > 4 else ''}); pass x64=False to check at "
                     "their own precision")
    ev = Evaluator(loss, sp, plan.theta, plan.dtypes, args, has_aux=has_aux,
                   memory_budget=memory_budget,
                   progress=Progress() if enabled(progress) else None)
    if not ev.traceable:
        notes.append("the loss is not traceable by JAX (it converts to NumPy), so jgc "
                     "evaluated it on the host, one perturbation at a time")
    # jax.grad and the user's gradient compile on other threads while the loss compiles here:
    # XLA releases the GIL, and on a small problem compilation is most of the time. Each
    # thread runs under the check's effective precision (JAX's x64 flag is thread-local).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        autodiff_job = pool.submit(in_precision, effective_x64, ev.autodiff)
        grad_job = (pool.submit(in_precision, effective_x64, _checked_gradient, ev, grad)
                    if _is_function(grad) else None)
        f0 = ev.at()
        autodiff, autodiff_why, autodiff_error = autodiff_job.result()
        grad_out = None if grad_job is None else grad_job.result()
    if ev.batch_error:
        notes.append(f"the loss cannot be vmapped ({ev.batch_error}), so jgc evaluated the "
                     "perturbations one at a time inside the compiled program: the slower path")
    if ev.grad_note:
        notes.append(ev.grad_note)
    if not np.isfinite(f0):
        raise InputError(f"the loss is {f0} at params (before any perturbation). "
                         f"{_where_not_finite(params, args)}jgc needs a finite loss to compare "
                         "gradients.")
    f0_again = ev.at()

    # The gradients being compared.
    if grad is None:
        if autodiff is None:
            raise autodiff_failure(autodiff_why, autodiff_error, ev) from autodiff_error
        checked_leaves = _flat_to_leaves(sp, autodiff)
        source = "jax.grad"
    else:
        if _is_function(grad):
            checked_leaves = match_gradient(_without_aux(grad_out, sp, params, has_aux), sp,
                                            params, "grad(params, *args)")
        else:
            checked_leaves = match_gradient(grad, sp, params, "grad")
        source = source_name
    if f0_again != f0 and not (np.isnan(f0) and np.isnan(f0_again)):
        return _randomness_report(sp, plan, ev, f0, f0_again, source, start, notes)
    ad_leaves = None if (autodiff is None or grad is None) else _flat_to_leaves(sp, autodiff)

    if plan.mode == "sample":
        plan = dataclasses.replace(plan, entries=tuple(
            pl.sample_entries(sp, samples, seed, checked_leaves)))
    if plan.mode == "auto" and not ev.traceable:
        plan = dataclasses.replace(plan, mode="full")  # host loops: no faster mode exists

    # Rounding unit: the coarser of the parameters' and the loss's dtype (a loss may cast to f32).
    u = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))
    float64 = u <= pl.machine_eps(np.float64)
    sigma = _measure_noise(ev, sp, plan)
    if sigma is not None:
        plan = pl.with_noise(plan, sigma / _variation(f0, f_scale, plan.theta,
                                                      ad_leaves or checked_leaves))

    # Reduced precision and Richardson take the 2h stencil everywhere: the leaf-level test and
    # the extrapolation need it. Refinement (h/4, h/8) only where the user fixed neither the
    # step nor the tolerance: their choice stands.
    full = method == "richardson" or (not float64 and method != "complex")
    schedule = es.Schedule(method, everywhere=full,
                           refine=eps is None and rtol is None and atol is None,
                           rtol=rtol, atol=atol)
    context = dict(ev=ev, sp=sp, f0=f0, sigma=sigma, u=u, float64=float64, f_scale=f_scale,
                   seed=seed, schedule=schedule, checked_leaves=checked_leaves,
                   ad_leaves=ad_leaves, checked_is_autodiff=grad is None)
    found = None
    if plan.mode == "auto":
        # A full check, unless its first stencil, timed as it runs, predicts too long a one.
        factor = 3.0 if method == "richardson" else 2.0 if full else 1.25
        deadline = Deadline(pl.AUTO_SECONDS, factor, len(sp.checked))
        try:
            found = _coordinate_phase(plan, deadline=deadline, **context)
            plan = dataclasses.replace(plan, mode="full")
        except TooSlow as e:
            plan = dataclasses.replace(plan, mode="directional", entries=tuple(
                pl.sample_entries(sp, samples, seed, checked_leaves)))
            notes.append(f"auto: a full check would take about {_duration(e.predicted)} "
                         f"({factor * sp.n * 2:,.0f} evaluations at the measured "
                         f"{deadline.rate * 1e3:.2g} ms each, after compilation), so jgc tested "
                         "random directions in every leaf, located any wrong entry by group "
                         f"testing, and checked a sample of up to {samples} entries per leaf; "
                         "mode='full' checks every entry")
    outcomes: dict[int, dr.LeafOutcome] = {}
    if plan.mode == "directional":
        plan, outcomes, escalated = _directional_phase(
            ev, sp, plan, f0, sigma, u, float64, f_scale, seed, checked_leaves, ad_leaves,
            schedule, samples, grad is None)
        if escalated:
            notes.append(f"directional: random directions resolve {', '.join(escalated[:5])}"
                         f"{', ...' if len(escalated) > 5 else ''} no better than "
                         f"{dg.COARSE:.0%}, so jgc also checked up to {samples} of "
                         f"{'its' if len(escalated) == 1 else 'their'} entries one by one")
    if found is None:
        found = _coordinate_phase(plan, **context)
    model, cmp, cmp_ad = found.model, found.cmp, found.cmp_ad
    g, g_round, g_ad, ad_round = found.g, found.g_round, found.g_ad, found.ad_round
    m = len(g)
    tol = es.tolerance(model.error + g_round, model.value, rtol, atol)
    accept = es.acceptance(model, tol, g_round, rtol, atol)
    agree = None if g_ad is None else np.abs(g - g_ad) <= tol + es.TOL_FACTOR * ad_round
    leaf_test = full and sigma is not None and rtol is None and atol is None

    # Per-leaf results and the diagnosis. Resolution is judged unless the user fixed the
    # tolerance (rtol/atol): then what passes is theirs to choose.
    zero_bound = None if (rtol is not None or atol is not None) else es.zero_bound(checked_leaves)
    ad_zero_bound = 0.0 if ad_leaves is None else es.zero_bound(ad_leaves)
    leaves, agrees, pos = [], {}, 0
    checked_at = {i: k for k, i in enumerate(sp.checked)}
    for i, spec in enumerate(sp.specs):
        if i not in checked_at:
            leaves.append(dg.skipped_report(spec))
            continue
        k = checked_at[i]
        sl = slice(pos, pos + len(plan.entries[k]))
        pos = sl.stop
        dat = dg.LeafData(
            spec, plan.entries[k], plan.leaf_values(sp, k)[plan.entries[k]], model.value[sl],
            tol[sl], g[sl], _slice_cmp(cmp, sl), None if g_ad is None else g_ad[sl],
            None if cmp_ad is None else _slice_cmp(cmp_ad, sl),
            None if agree is None else agree[sl], kink=model.kink[sl],
            collective=_collective(model, g, g_round, sl) if leaf_test else None,
            autodiff_collective=(_collective(model, g_ad, ad_round, sl)
                                 if leaf_test and g_ad is not None else None),
            zero_bound=zero_bound, autodiff_zero_bound=ad_zero_bound,
            pair_rounding=(g_round + ad_round)[sl] if g_ad is not None else 0.0,
            accept_width=accept[sl])
        report = dg.leaf_report(dat, full=plan.mode == "full")
        agrees[spec.path] = dg.agrees_with_autodiff(dat)
        if k in outcomes:
            report, agree_dir = dr.merge(report, outcomes[k], checked_leaves[k],
                                         None if ad_leaves is None else ad_leaves[k],
                                         judge_resolution=zero_bound is not None)
            agrees[spec.path] = agrees[spec.path] if agree_dir is None else agree_dir
        leaves.append(report)
    batch = _batch_size(args)
    verdict, text = dg.diagnose(leaves, agrees, source=source, has_autodiff=autodiff is not None,
                                autodiff_why=autodiff_why, batch=batch, eps=eps,
                                float64=float64, method=method)
    if autodiff is None and grad is not None:
        notes.append(f"jax.grad is not available as a third opinion: {autodiff_why}")
    mutation = _mutation_note(ev, grad)
    if mutation:
        notes.append(mutation)
        text += f"\nWarning: {mutation}."
    if method == "richardson" and model.kink.any():
        notes.append(f"the loss has kinks ({int(model.kink.sum())} entries): Richardson's wide "
                     "stencil (h, 2h, 4h at h = u**(1/5)) assumes smoothness over it and can be "
                     "wrong near them; for relu or max-pool losses prefer method='central'")
    if plan.mode == "sample":
        notes.append(f"sampled: {m} of {sp.n} entries were checked (up to {samples} per leaf, "
                     f"seed={seed}); use mode='full' to check every entry")
    if plan.mode == "directional":
        notes.append(f"directional: {dr.N_DIRECTIONS} random directions per leaf (seeded by "
                     f"its path, seed={seed}); a full check would cost at least {2 * sp.n:,} "
                     "evaluations")
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.linalg.norm(g - model.value)
        den = np.linalg.norm(g) + np.linalg.norm(model.value)
        global_rel = float(num / den) if den > 0 else 0.0
    if not np.all(np.isfinite(g)):
        global_rel = math.inf  # Inf/Inf is NaN: a non-finite gradient is infinitely wrong
    return Report(
        ok=verdict == "ok", verdict=verdict, leaves=tuple(leaves), global_rel_error=global_rel,
        diagnosis=text, checked_source=source, precision=_precision_name(plan, ev),
        method=_method_name(method, full), mode=plan.mode, step=plan.step_rule, n_params=sp.n,
        n_checked=m, n_evaluations=ev.n_evaluations, seconds=time.perf_counter() - start,
        notes=tuple(notes), noise=sigma)


def _where_not_finite(params, args) -> str:
    """Names the inputs holding NaN or Inf, or says that they are all finite."""
    bad = []
    for name, tree in (("params", params), ("args", args)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            a = np.asarray(leaf) if hasattr(leaf, "shape") or isinstance(leaf, float) else None
            if a is not None and np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
                n = int((~np.isfinite(a)).sum())
                bad.append(f"{name}{jax.tree_util.keystr(path)} ({n} non-finite entr"
                           f"{'y' if n == 1 else 'ies'})")
    if bad:
        return f"The inputs are not finite: {', '.join(bad[:5])}. Fix or filter them first; "
    return ("Every input is finite, so the loss itself produces it (log or division at 0, an "
            "overflow in exp): check the initialisation and the data scale; ")


def _mutation_note(ev: Evaluator, grad) -> str | None:
    """grad(params, *args) on the host gets copies; if it changed them, say which."""
    changed = getattr(ev, "mutated", None)
    if not changed:
        return None
    return (f"grad(params, *args) modified its inputs in place ({', '.join(changed[:5])}). jgc "
            "passed it copies, so your arrays are intact, but in training this corrupts the "
            "parameters or data: make the gradient function return new arrays")


def _is_function(grad) -> bool:
    """A gradient *function*, as opposed to a ready gradient pytree. Equinox modules are
    callable pytrees: one that holds arrays is a ready gradient (eqx.filter_grad returns one)."""
    return callable(grad) and not any(
        isinstance(x, (np.ndarray, np.generic, jax.Array))
        for x in jax.tree_util.tree_leaves(grad))


def _without_aux(out, sp: Split, params, has_aux: bool):
    """A gradient function's output; with has_aux, (grad, aux) as jax.grad(has_aux=True)
    returns it is accepted too."""
    if has_aux and isinstance(out, tuple) and len(out) == 2:
        try:
            match_gradient(out[0], sp, params)
        except InputError:
            return out
        return out[0]
    return out


def _user_frame(error: BaseException):
    """The innermost traceback frame in the user's code (not JAX's, NumPy's or jgc's)."""
    skip = ("/jax/", "/jaxlib/", "/jgc/_src/", "/numpy/", "/concurrent/", "/threading.py",
            "/contextlib.py")
    tb, found = error.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if not any(part in name for part in skip):
            found = tb
        tb = tb.tb_next
    return found


def _rule_functions(jaxpr) -> dict:
    """Code objects of the custom_vjp backward rules in a jaxpr (nested ones included)."""
    out = {}
    for eqn in jaxpr.eqns:
        bwd = eqn.params.get("bwd")
        f = getattr(bwd, "f", None)
        if eqn.primitive.name == "custom_vjp_call" and hasattr(f, "__code__"):
            out[f.__code__] = f.__name__
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    out.update(_rule_functions(inner))
    return out


def _callbacks(jaxpr) -> set[str]:
    """Names of the host-callback primitives a jaxpr uses (nested ones included)."""
    out = set()
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name and eqn.primitive.name != "debug_callback":
            out.add(f"jax.{eqn.primitive.name}")
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    out |= _callbacks(inner)
    return out


def autodiff_failure(why: str, error: BaseException | None, ev: Evaluator) -> InputError:
    """The error for grad=None when jax.grad itself cannot be computed.

    When the failure is inside a custom_vjp backward rule, that rule is what is under test: the
    message says so (and the caller chains the original exception, so its line shows).
    """
    if error is None:
        return InputError(
            f"grad=None asks jgc to check jax.grad, but {why}. Pass your hand-written gradient "
            "as grad= (a function grad(params, *args), a pytree shaped like params, or a flat "
            "vector).")
    text = str(error).splitlines()[0].rstrip(".") if str(error) else ""
    callbacks = _callbacks(ev.traced.closed.jaxpr) if ev.traced is not None else set()
    if callbacks:
        return InputError(
            f"grad=None checks jax.grad, but the loss calls {', '.join(sorted(callbacks))}, "
            f"which JAX cannot differentiate ({type(error).__name__}: {text}). Pass your "
            "hand-written gradient as grad=: jgc evaluates such a loss anyway, one "
            "perturbation at a time.")
    frame = _user_frame(error)
    where = ""
    if frame is not None:
        code = frame.tb_frame.f_code
        where = f" at {code.co_filename}:{frame.tb_lineno} in {code.co_name}()"
        rules = _rule_functions(ev.traced.closed.jaxpr) if ev.traced is not None else {}
        if code in rules:
            return InputError(
                f"grad=None checks jax.grad, and jax.grad failed: the backward rule "
                f"`{rules[code]}` of a jax.custom_vjp function raised {type(error).__name__}: "
                f"{text}{where}. That rule is what is under test, and it crashes before any "
                "number can be compared: fix it (the chained traceback above shows the "
                "failing line), then check again.")
    return InputError(
        f"grad=None checks jax.grad, but jax.grad raised {type(error).__name__}: {text}{where}. "
        "If the loss uses a jax.custom_vjp or custom_jvp rule, that rule is the likely "
        "culprit (the chained traceback above shows the failing line); otherwise the loss "
        "uses an operation JAX cannot differentiate: pass your own gradient as grad=.")


def _checked_gradient(ev: Evaluator, grad):
    try:
        return ev.call(grad)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"grad(params, *args) raised {type(e).__name__}: {e}") from e


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass(frozen=True)
class _Coordinates:
    """The coordinate phase's results: the gradients at the planned entries and their model."""

    model: es.ErrorModel
    cmp: es.Comparison
    cmp_ad: es.Comparison | None
    g: np.ndarray
    g_round: np.ndarray
    g_ad: np.ndarray | None
    ad_round: np.ndarray | float


def _coordinate_phase(plan, *, ev, sp, f0, sigma, u, float64, f_scale, seed, schedule,
                      checked_leaves, ad_leaves, checked_is_autodiff, deadline=None
                      ) -> _Coordinates:
    """Every planned entry, one by one: the stencil schedule (or the complex step)."""
    g = _restricted(sp, plan, checked_leaves)
    g_round = _gradient_rounding(plan, checked_leaves)
    g_ad = None if ad_leaves is None else _restricted(sp, plan, ad_leaves)
    ad_round = 0.0 if g_ad is None else _gradient_rounding(plan, ad_leaves)
    index = _global_indices(sp, plan)
    if plan.method == "complex":
        model = _complex_step_model(ev, sp, plan, f0, sigma, u, float64, f_scale, seed)
        cmp = es.compare(g, model, schedule.rtol, schedule.atol, g_round)
        cmp_ad = (None if g_ad is None
                  else es.compare(g_ad, model, schedule.rtol, schedule.atol, ad_round))
        return _Coordinates(model, cmp, cmp_ad, g, g_round, g_ad, ad_round)
    found = es.derivative(_coordinates(ev, sp, plan, index, deadline),
                          es.differences(f0, len(index), sigma, u, float64, f_scale), g,
                          g_round, g_ad, ad_round, schedule=schedule,
                          checked_is_autodiff=checked_is_autodiff)
    return _Coordinates(found.model, found.cmp, found.cmp_ad, g, g_round, g_ad, ad_round)


def _directional_phase(ev, sp, plan, f0, sigma, u, float64, f_scale, seed, checked_leaves,
                       ad_leaves, schedule, samples, checked_is_autodiff):
    """Directions per leaf; the entries group testing leaves in doubt join the plan, to be
    checked one by one with the coordinate error model. A leaf whose directions resolve no
    better than COARSE (float32 noise against a small directional derivative) also gets a
    sample of entries checked one by one: directions alone would leave it unverified."""
    run = dr.Directional(ev, sp, plan, f0, sigma, u, float64, f_scale, seed, schedule,
                         checked_is_autodiff)
    outcomes, entries, escalated = {}, list(plan.entries), []
    extra = pl.sample_entries(sp, samples, seed, checked_leaves)
    for k in range(len(sp.checked)):
        g = np.asarray(checked_leaves[k], np.float64).ravel()
        g_ad = None if ad_leaves is None else np.asarray(ad_leaves[k], np.float64).ravel()
        outcomes[k] = run.run_leaf(k, g, leaf_rounding(checked_leaves[k]), g_ad)
        entries[k] = np.union1d(entries[k], outcomes[k].candidates).astype(np.int64)
        if outcomes[k].resolution > dg.COARSE and len(entries[k]) < len(extra[k]):
            entries[k] = np.union1d(entries[k], extra[k]).astype(np.int64)
            escalated.append(sp.checked_specs()[k].path or "<params>")
    return dataclasses.replace(plan, entries=tuple(entries)), outcomes, escalated


def complex_step(ev, sp, plan, f0, sigma, u, float64, f_scale, seed) -> np.ndarray:
    """The complex step Im f(x + i h e_k) / h for every planned entry, after checking on a
    sample that the loss is complex-analytic (else its "derivative" is meaningless, and for
    abs or .real it is silently zero).

    Raises InputError when the loss is not traceable, cannot take complex parameters, or is not
    analytic.
    """
    if not ev.traceable:
        raise InputError("method='complex' needs a loss JAX can trace (it evaluates it at "
                         "complex parameters); this one is not traceable. Use "
                         "method='central'.")
    index = _global_indices(sp, plan)
    hp, _ = _all_steps(sp, plan, 1.0)
    value = ev.complex_step(index, hp)
    # Analyticity: compare with central differences (and their error bars) on a sample.
    sample = dataclasses.replace(plan, entries=tuple(pl.sample_entries(sp, 2, seed)),
                                 method="central")
    s_index = _global_indices(sp, sample)
    d = es.differences(f0, len(s_index), sigma, u, float64, f_scale)
    d = _stencil(ev, sp, sample, d, 0, np.ones(len(s_index), bool), s_index)
    d = _stencil(ev, sp, sample, d, 1, np.ones(len(s_index), bool), s_index)
    central = es.error_model(d)
    pos = {int(i): j for j, i in enumerate(index)}
    cs = value[[pos[int(i)] for i in s_index]]
    cs_err = es.rounding(cs, u, float(np.max(np.abs(cs))) if cs.size else 0.0)
    off = np.abs(cs - central.value) > es.TOL_FACTOR * (central.error + cs_err)
    if off.any():
        j = int(np.argmax(off))
        raise InputError(
            f"method='complex' needs a complex-analytic loss, but at {sp.locate(s_index[j])} "
            f"the complex step gives {cs[j]:.6g} where central differences give "
            f"{central.value[j]:.6g}: the loss is not analytic (abs, max, relu, comparisons, "
            "or code that drops the imaginary part, such as .real, float() or NumPy). Use "
            "method='central', or method='richardson' for more digits.")
    return value


def _complex_step_model(ev, sp, plan, f0, sigma, u, float64, f_scale, seed) -> es.ErrorModel:
    """The complex step as an error model.

    Error bar: the complex step has no subtractive cancellation, and with h = u·max(1, |x|) its
    truncation (h**2 times the third derivative, over 6) is below rounding; what remains is the
    rounding of the derivative itself, bounded like a gradient's (estimate.rounding, on the
    leaf's scale).
    """
    value = complex_step(ev, sp, plan, f0, sigma, u, float64, f_scale, seed)
    scale = np.concatenate([np.full(len(e), float(np.max(np.abs(value[a:a + len(e)])))
                                    if len(e) else 0.0)
                            for a, e in zip(np.cumsum([0] + [len(e) for e in plan.entries]),
                                            plan.entries)]) if len(value) else np.zeros(0)
    error = es.rounding(value, u, scale)
    nan = np.full(len(value), np.nan)
    return es.ErrorModel(value, error, np.zeros(len(value), bool), nan, nan, value,
                         error / es.NOISE_SIGMAS, np.ones(len(value), bool))


def _method_name(method: str, full: bool) -> str:
    if method == "complex":
        return "complex step Im f(x + ih)/h (analyticity verified on a sample)"
    if method == "richardson":
        return "Richardson extrapolation of central differences at h, 2h, 4h"
    if full:
        return "central differences at h and 2h (every entry: reduced precision)"
    return "central differences (second stencil at 2h where needed)"


def _collective(model: es.ErrorModel, g: np.ndarray, g_round: np.ndarray, sl: slice
                ) -> dg.Collective:
    """The leaf-level test: are the leaf's residuals, taken together, larger than noise?

    Against the Richardson reference (truncation O(h**4), negligible for a smooth loss), each
    residual's standard deviation comes from the measured noise and the gradient's own rounding
    (its bound is NOISE_SIGMAS standard deviations). Kinks are left out: their reference is not
    a derivative; so are entries whose refined estimate left the coarse one (their reference is
    biased by a kink the coarse stencils crossed). Kinks crossed but not flagged leave residuals
    too: the diagnosis calls an excess in a leaf of MIN_FIT entries or more a bug only when a
    systematic pattern explains it (diagnose.Collective.fit).
    """
    keep = ~model.kink[sl] & model.coarse[sl]
    ref, g = model.reference[sl][keep], g[sl][keep]
    sd = np.sqrt(model.reference_sd[sl][keep] ** 2
                 + (np.broadcast_to(g_round, model.kink.shape)[sl][keep] / es.NOISE_SIGMAS) ** 2)
    return dg.Collective(ref, sd, es.chi2(g - ref, sd), es.chi2_threshold(int(keep.sum())),
                         np.flatnonzero(keep))


def leaf_rounding(a) -> np.ndarray:
    """Per entry of a gradient leaf (flattened): the rounding error it carries in its own
    dtype, bounded on the scale of the leaf's largest entry (see estimate.rounding)."""
    a = np.asarray(a)
    eps = pl.machine_eps(a.dtype) if np.issubdtype(a.dtype, np.floating) else 0.0
    a = a.ravel().astype(np.float64)
    finite = np.isfinite(a)
    # A non-finite entry is a mismatch of its own (estimate.compare); it must not widen the
    # error bar of the others, as an Inf scale would.
    scale = float(np.max(np.abs(a[finite]))) if finite.any() else 0.0
    return np.where(finite, es.rounding(a, eps, scale), 0.0)


def _gradient_rounding(plan: pl.Plan, leaves: list[np.ndarray]) -> np.ndarray:
    """Per planned entry: the rounding error the gradient carries in its own dtype."""
    parts = [leaf_rounding(a)[e] for a, e in zip(leaves, plan.entries)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _slice_cmp(c: es.Comparison, sl: slice) -> es.Comparison:
    return es.Comparison(c.status[sl], c.abs_error[sl], c.rel_error[sl])


def _precision_name(plan: pl.Plan, ev: Evaluator) -> str:
    names = sorted({str(d) for d in plan.dtypes})
    return "/".join(names) + (" (x64)" if plan.x64 else "")


def _check_finite(sp: Split, index: np.ndarray, values: np.ndarray, m: int) -> None:
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


def _randomness_report(sp, plan, ev, f0, f0_again, source, start, notes) -> Report:
    leaves = tuple(dg.skipped_report(s) if not s.checked else
                   LeafReport(s.path, s.shape, s.dtype, 0, "mismatch") for s in sp.specs)
    text = (f"The loss returned different values for identical inputs ({f0!r}, then "
            f"{f0_again!r}): it uses hidden randomness (np.random inside the loss, dropout "
            "drawing its own mask, a global counter). Finite differences of a random function "
            "are meaningless, so no gradient was judged. This is not a gradient bug. Pass the "
            "randomness in explicitly: draw the mask or PRNG key outside the loss and pass it as "
            "an argument, e.g. check_grad(loss, params, X, y, key).")
    return Report(ok=False, verdict="randomness", leaves=leaves, global_rel_error=float("nan"),
                  diagnosis=text, checked_source=source, precision=_precision_name(plan, ev),
                  method="-", mode=plan.mode, step=plan.step_rule, n_params=sp.n, n_checked=0,
                  n_evaluations=ev.n_evaluations, seconds=time.perf_counter() - start,
                  notes=tuple(notes))


# -- public API -------------------------------------------------------------------------------

def check_grad(loss: Loss, params: ArrayTree, *args, grad=None, x64: bool = True,
               mode: str = "auto", method: str = "central", eps: float | None = None,
               rtol: float | None = None, atol: float | None = None,
               samples: int = pl.DEFAULT_SAMPLES, seed: int = 0,
               memory_budget: int | None = None, progress: bool | None = None,
               has_aux: bool = False) -> Report:
    """Checks a gradient of `loss` against finite differences and jax.grad, leaf by leaf.

    Args:
      loss: `loss(params, *args) -> scalar`, in JAX or NumPy.
      params: any pytree. Floating-point array leaves are checked; other leaves (ints, bools,
        None, strings, callables) are held fixed and reported as "skipped".
      *args: passed to `loss` (and `grad`) unchanged, never perturbed: data, labels, a PRNG key.
      grad: the gradient to check: a function `grad(params, *args)` (JAX or NumPy) returning a
        pytree shaped like params, a ready pytree, or a flat vector in `ravel_pytree` order. With
        None, jax.grad(loss) is checked (this is how custom_vjp/custom_jvp rules are tested).
      x64: evaluate in float64 (default). The global setting is restored afterwards, even when
        the check raises. With False, the check runs at the parameters' own precision.
      mode: "full" checks every entry. "sample" checks `samples` seeded entries per leaf.
        "directional" tests random directions per leaf and, where one fails, finds the wrong
        entries by group testing (O(log n) evaluations): for models too large for "full".
        "auto" (default) runs "full" when one timed evaluation predicts it takes under 5 s, and
        else "directional" plus a sample, saying so in the report.
      method: "central" (default): central differences, 2 loss evaluations per entry (4 at
        reduced precision, where every entry is also evaluated at 2h). "richardson":
        extrapolation from h, 2h and 4h with a larger step, 6 evaluations per entry (3x the
        cost) for about one more correct digit; worth it in float32.
      eps: a fixed absolute step. None (default) picks u**(1/3)·max(1,|θ|) per entry.
      rtol, atol: override the error model: an entry fails when |g - num| > atol + rtol·|num|.
      samples: entries per leaf in mode "sample". seed: seeds the sample and the directions.
      memory_budget: bytes for one batch of perturbed evaluations (default: a quarter of the
        available memory, between 256 MiB and 1 GiB); chunks are sized to fit it.
      progress: show a progress bar on long checks (None: when stderr is a terminal or in a
        notebook; it appears only for checks predicted to take over 2 s).
      has_aux: the loss returns (value, aux), as for jax.value_and_grad(..., has_aux=True);
        aux is ignored. A gradient function may then return (grad, aux) too.

    Returns:
      A frozen `Report`: `.ok`, `.leaves` (per-leaf status, worst entry, pattern),
      `.global_rel_error`, `.diagnosis`; `print(report)` shows the table.

    Raises:
      InputError (a ValueError): on inputs jgc cannot check, with a message naming the leaf or
        argument and the fix.

    >>> import jax.numpy as jnp, jgc
    >>> loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2)
    >>> p, x = {"w": jnp.ones(3) * 0.1}, jnp.arange(6.0).reshape(2, 3)
    >>> jgc.check_grad(loss, p, x, grad=lambda p, x: {"w": 2 * p["w"]}).ok
    False
    >>> jgc.check_grad(loss, p, x).ok  # grad=None: checks jax.grad itself
    True
    """
    with precision(x64) as effective:
        return _run(loss, params, args, grad=grad, x64=x64, mode=mode, method=method, eps=eps,
                    rtol=rtol, atol=atol, samples=samples, seed=seed,
                    memory_budget=memory_budget, progress=progress, has_aux=has_aux,
                    effective_x64=effective)


def assert_grad(loss: Loss, params: ArrayTree, *args, grad=None,
                allow_unresolved: bool = False, **options) -> Report:
    """Like `check_grad`, but raises AssertionError naming every bad leaf when the check fails.

    A chex-style assertion for test suites: the message starts with "[jgc] " and contains the
    diagnosis and the full report table. Returns the Report when the check passes. A leaf that
    finite differences could not resolve fails the assertion too (nothing was verified
    there), unless `allow_unresolved=True`; mismatches always fail it.

    >>> import jax.numpy as jnp, jgc
    >>> _ = jgc.assert_grad(lambda p: jnp.sum(p ** 3), jnp.arange(3.0),
    ...                     grad=lambda p: 3 * p ** 2)
    """
    report = check_grad(loss, params, *args, grad=grad, **options)
    if report.ok or (allow_unresolved and report.verdict == "unresolved"):
        return report
    named = [*report.bad_leaves, *report.unresolved_leaves]
    bad = ", ".join(leaf.path or "<params>" for leaf in named) or "the loss"
    raise AssertionError(f"[jgc] gradient check failed ({report.verdict}) in: {bad}\n"
                         f"{report}")


def numerical_grad(loss: Loss, params: ArrayTree, *args, x64: bool = True,
                   method: str = "central", eps: float | None = None,
                   has_aux: bool = False) -> ArrayTree:
    """Finite-difference gradient of `loss` at `params`, shaped like params.

    Computed with the same batched evaluator, step rule and methods as `check_grad` (central
    differences by default; method="richardson" for more digits at 3x the cost; method="complex"
    for the complex step, exact to rounding for complex-analytic losses). Checked leaves
    come back as NumPy arrays in the evaluation dtype (float64 under x64); skipped leaves as
    None. With has_aux=True the loss returns (value, aux), as for jax.value_and_grad.

    Raises:
      InputError: as check_grad; method="complex" on a loss that is not complex-analytic
        (abs, max, .real, NumPy code) is refused, since its complex step is meaningless.

    >>> import jax.numpy as jnp, jgc
    >>> g = jgc.numerical_grad(lambda p: jnp.sum(p["a"] ** 2), {"a": jnp.array([1.0, -2.0])})
    >>> [round(float(v), 6) for v in g["a"]]
    [2.0, -4.0]
    """
    with precision(x64):
        _validate_callable(loss)
        refuse_unusable(params=params, args=args)
        sp = _split_checked(params)
        plan = pl.make_plan(sp, mode="full", x64=x64, eps=eps, samples=0, seed=0,
                            method=method)
        args, _ = promote_args(args, x64)
        ev = Evaluator(loss, sp, plan.theta, plan.dtypes, args, has_aux=has_aux)
        index = _global_indices(sp, plan)
        everywhere = np.ones(len(index), bool)
        u = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))
        float64 = u <= pl.machine_eps(np.float64)
        f0 = ev.at()
        if method == "complex":
            value = complex_step(ev, sp, plan, f0, None, u, float64, 0.0, 0)
        else:
            d = es.differences(f0, len(index), None, u, float64)
            for s in range(3 if method == "richardson" else 1):
                d = _stencil(ev, sp, plan, d, s, everywhere, index)
            value = es.error_model(d, method).value
        out = [None] * len(sp.specs)
        for k, (i, leaf) in enumerate(zip(sp.checked, _flat_to_leaves(sp, value))):
            out[i] = leaf.astype(plan.dtypes[k])
        return jax.tree_util.tree_unflatten(sp.treedef, out)
