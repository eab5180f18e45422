"""The pipeline, end to end: split -> plan -> evaluate -> estimate -> compare -> diagnose."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jgc._src import diagnose as dg
from jgc._src import estimate as es
from jgc._src import plan as pl
from jgc._src.evaluate import Evaluator
from jgc._src.report import LeafReport, Report
from jgc._src.tree import ArrayTree, InputError, Split, match_gradient, split

Loss = Callable[..., Any]  # loss(params, *args) -> scalar


@contextlib.contextmanager
def precision(x64: bool):
    """Float64 for the duration of a check (x64=True), restored afterwards even on error.

    `jax.enable_x64` is a context manager over the config option: on exit it restores the value
    it found, whether the body returned or raised (KeyboardInterrupt included).
    """
    if not isinstance(x64, bool):
        raise InputError(f"x64={x64!r}: expected True (check in float64, the default) or False "
                         "(check at the parameters' own precision).")
    if x64:
        with jax.enable_x64(True):
            yield
    else:
        yield


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


def _all_steps(sp: Split, plan: pl.Plan, scale: float) -> tuple[np.ndarray, np.ndarray]:
    pairs = [pl.steps(plan, sp, k, scale) for k in range(len(sp.checked))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def _validate_callable(loss, name="loss"):
    if not callable(loss):
        raise InputError(f"{name} must be a function {name}(params, *args) -> scalar, but got a "
                         f"{type(loss).__name__}. Did you pass the arguments in the wrong order? "
                         "The signature is check_grad(loss, params, *args, grad=...).")


def _run(loss: Loss, params: ArrayTree, args: tuple, *, grad, x64: bool, mode: str,
         eps: float | None, rtol: float | None, atol: float | None, samples: int, seed: int,
         f_scale: float = 0.0, source_name: str = "hand-written") -> Report:
    """The whole check. Pure: builds copies, never touches the user's arrays or config."""
    start = time.perf_counter()
    _validate_callable(loss)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not (np.isfinite(v) and v >= 0):
            raise InputError(f"{name}={v!r}: expected a non-negative number, or None to use the "
                             "error model.")
    sp = split(params)
    if not sp.checked:
        found = ", ".join(f"{s.path or '<params>'}: {s.reason}" for s in sp.specs)
        raise InputError(
            "params has no floating-point leaves to check"
            + (f" (its leaves: {found})" if sp.specs else " (it is empty)")
            + ". Pass the trainable parameters as float arrays, e.g. "
            "{'W': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}.")
    plan = pl.make_plan(sp, mode=mode, x64=x64, eps=eps, samples=samples, seed=seed)
    notes: list[str] = []
    ev = Evaluator(loss, sp, plan.theta, plan.dtypes, args)
    if not ev.traceable:
        notes.append("the loss is not traceable by JAX (plain NumPy?), so every perturbation "
                     "was evaluated in a Python loop on the host: the slow path "
                     f"({ev.trace_error})")
    f0 = ev.at()
    if not np.isfinite(f0):
        raise InputError(f"the loss is {f0} at params (before any perturbation). Check the "
                         "inputs and the initialisation: jgc needs a finite loss to compare "
                         "gradients.")
    f0_again = ev.at()
    # Rounding unit: the coarser of the parameters' and the loss's dtype (a loss may cast to f32).
    u = max(pl.machine_eps(d) for d in (*plan.dtypes, ev.out_dtype))

    # The gradients being compared.
    autodiff, autodiff_why = ev.autodiff()
    if grad is None:
        if autodiff is None:
            raise InputError(
                f"grad=None asks jgc to check jax.grad, but {autodiff_why}. Pass your "
                "hand-written gradient as grad=(a function grad(params, *args), a pytree shaped "
                "like params, or a flat vector).")
        checked_leaves = _flat_to_leaves(sp, autodiff)
        source = "jax.grad"
    else:
        if callable(grad):
            try:
                out, _jitted = ev.call(grad)
            except InputError:
                raise
            except Exception as e:
                raise InputError(f"grad(params, *args) raised {type(e).__name__}: {e}") from e
            checked_leaves = match_gradient(out, sp, params, "grad(params, *args)")
        else:
            checked_leaves = match_gradient(grad, sp, params, "grad")
        source = source_name
    if f0_again != f0 and not (np.isnan(f0) and np.isnan(f0_again)):
        return _randomness_report(sp, plan, ev, f0, f0_again, source, start, notes)

    g = _restricted(sp, plan, checked_leaves)
    g_round = _gradient_rounding(plan, checked_leaves)
    g_ad = None if (autodiff is None or grad is None) else _restricted(
        sp, plan, _flat_to_leaves(sp, autodiff))
    ad_round = 0.0 if g_ad is None else _gradient_rounding(plan, _flat_to_leaves(sp, autodiff))

    # First stencil: f(x + h+ e_i) and f(x - h- e_i) for every planned entry, in one batch.
    index = _global_indices(sp, plan)
    hp, hm = _all_steps(sp, plan, 1.0)
    values = ev.perturbed(np.concatenate([index, index]), np.concatenate([hp, -hm]))
    m = len(index)
    diffs = es.first_stencil(f0, values[:m], values[m:], hp, hm, u, f_scale)
    _check_finite(sp, index, values, m)

    # Second stencil, at twice the step, only where a gradient disagrees with the first.
    sus = es.suspects(diffs, g, rtol, atol, g_round)
    if g_ad is not None:
        sus |= es.suspects(diffs, g_ad, rtol, atol, ad_round)
    if sus.any():
        hp2, hm2 = _all_steps(sp, plan, 2.0)
        hp2, hm2 = hp2[sus], hm2[sus]
        values2 = ev.perturbed(np.concatenate([index[sus], index[sus]]),
                               np.concatenate([hp2, -hm2]))
        k = int(sus.sum())
        diffs = es.with_second_stencil(diffs, sus, values2[:k], values2[k:], hp2, hm2, u, f_scale)
    model = es.error_model(diffs)
    cmp = es.compare(g, diffs, model, rtol, atol, g_round)
    cmp_ad = None if g_ad is None else es.compare(g_ad, diffs, model, rtol, atol, ad_round)
    tol = es.tolerance(model.error + g_round, diffs.central, rtol, atol)
    agree = None if g_ad is None else np.abs(g - g_ad) <= tol + es.TOL_FACTOR * ad_round

    # Per-leaf results and the diagnosis.
    leaves, data, pos = [], {}, 0
    checked_at = {i: k for k, i in enumerate(sp.checked)}
    for i, spec in enumerate(sp.specs):
        if i not in checked_at:
            leaves.append(dg.skipped_report(spec))
            continue
        k = checked_at[i]
        sl = slice(pos, pos + len(plan.entries[k]))
        pos = sl.stop
        d = dg.LeafData(
            spec, plan.entries[k], plan.leaf_values(sp, k)[plan.entries[k]], diffs.central[sl],
            tol[sl], g[sl], _slice_cmp(cmp, sl), None if g_ad is None else g_ad[sl],
            None if cmp_ad is None else _slice_cmp(cmp_ad, sl),
            None if agree is None else agree[sl])
        data[spec.path] = d
        leaves.append(dg.leaf_report(d, full=plan.mode == "full"))
    batch = _batch_size(args)
    verdict, text = dg.diagnose(leaves, data, source=source, has_autodiff=autodiff is not None,
                                autodiff_why=autodiff_why, batch=batch, eps=eps)
    if autodiff is None and grad is not None:
        notes.append(f"jax.grad is not available as a third opinion: {autodiff_why}")
    if plan.mode == "sample":
        notes.append(f"sampled: {m} of {sp.n} entries were checked (up to {samples} per leaf, "
                     f"seed={seed}); use mode='full' to check every entry")
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.linalg.norm(g - diffs.central)
        den = np.linalg.norm(g) + np.linalg.norm(diffs.central)
        global_rel = float(num / den) if den > 0 else 0.0
    return Report(
        ok=verdict == "ok", verdict=verdict, leaves=tuple(leaves), global_rel_error=global_rel,
        diagnosis=text, checked_source=source, precision=_precision_name(plan, ev),
        method="central differences (second stencil at 2h where needed)", mode=plan.mode,
        step=plan.step_rule, n_params=sp.n, n_checked=m, n_evaluations=ev.n_evaluations,
        seconds=time.perf_counter() - start, notes=tuple(notes))


def _gradient_rounding(plan: pl.Plan, leaves: list[np.ndarray]) -> np.ndarray:
    """Per planned entry: the rounding error the gradient carries in its own dtype."""
    parts = []
    for a, e in zip(leaves, plan.entries):
        a = np.asarray(a)
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        eps = pl.machine_eps(a.dtype) if np.issubdtype(a.dtype, np.floating) else 0.0
        parts.append(es.rounding(a.ravel()[e].astype(np.float64), eps, scale))
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
               mode: str = "auto", eps: float | None = None, rtol: float | None = None,
               atol: float | None = None, samples: int = pl.DEFAULT_SAMPLES, seed: int = 0
               ) -> Report:
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
      mode: "full" checks every entry; "sample" checks `samples` seeded entries per leaf; "auto"
        (default) runs "full" up to 200,000 parameters and "sample" beyond.
      eps: a fixed absolute step. None (default) picks u**(1/3)·max(1,|θ|) per entry.
      rtol, atol: override the error model: an entry fails when |g - num| > atol + rtol·|num|.
      samples: entries per leaf in mode "sample". seed: seeds the sample.

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
    with precision(x64):
        return _run(loss, params, args, grad=grad, x64=x64, mode=mode, eps=eps, rtol=rtol,
                    atol=atol, samples=samples, seed=seed)


def assert_grad(loss: Loss, params: ArrayTree, *args, grad=None, **options) -> Report:
    """Like `check_grad`, but raises AssertionError naming every bad leaf when the check fails.

    A chex-style assertion for test suites: the message starts with "[jgc] " and contains the
    diagnosis and the full report table. Returns the Report when the check passes.

    >>> import jax.numpy as jnp, jgc
    >>> _ = jgc.assert_grad(lambda p: jnp.sum(p ** 3), jnp.arange(3.0),
    ...                     grad=lambda p: 3 * p ** 2)
    """
    report = check_grad(loss, params, *args, grad=grad, **options)
    if not report.ok:
        bad = ", ".join(leaf.path or "<params>" for leaf in report.bad_leaves)
        raise AssertionError(f"[jgc] gradient check failed ({report.verdict}) in: {bad}\n"
                             f"{report}")
    return report


def numerical_grad(loss: Loss, params: ArrayTree, *args, x64: bool = True,
                   eps: float | None = None) -> ArrayTree:
    """Central-difference gradient of `loss` at `params`, shaped like params.

    Computed with the same batched evaluator and step rule as `check_grad`. Checked leaves come
    back as NumPy arrays in the evaluation dtype (float64 under x64); skipped leaves as None.

    >>> import jax.numpy as jnp, jgc
    >>> g = jgc.numerical_grad(lambda p: jnp.sum(p["a"] ** 2), {"a": jnp.array([1.0, -2.0])})
    >>> [round(float(v), 6) for v in g["a"]]
    [2.0, -4.0]
    """
    with precision(x64):
        _validate_callable(loss)
        sp = split(params)
        plan = pl.make_plan(sp, mode="full", x64=x64, eps=eps, samples=0, seed=0)
        ev = Evaluator(loss, sp, plan.theta, plan.dtypes, args)
        index = _global_indices(sp, plan)
        hp, hm = _all_steps(sp, plan, 1.0)
        values = ev.perturbed(np.concatenate([index, index]), np.concatenate([hp, -hm]))
        m = len(index)
        central = (values[:m] - values[m:]) / (hp + hm)
        out = [None] * len(sp.specs)
        for k, (i, leaf) in enumerate(zip(sp.checked, _flat_to_leaves(sp, central))):
            out[i] = leaf.astype(plan.dtypes[k])
        return jax.tree_util.tree_unflatten(sp.treedef, out)
