"""The public checks of a loss's gradient: check_grad, assert_grad and numerical_grad.

Thin layers over the pipeline (pipeline.py): each validates its options, enters the check's
precision (restored afterwards, even on error), describes what it checks as a `Subject` and runs
the stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex

from jgc._src.evaluators import calls
from jgc._src.report.report import Report
from jgc._src.report.vocab import Verdict
from jgc._src.stages import pipeline
from jgc._src.stages.plan import DEFAULT_SAMPLES
from jgc._src.stages.prepare import Subject, precision
from jgc._src.stages.split import ArrayTree
from jgc._src.surfaces.options import make_options
from jgc._src.surfaces.recording import recorded

Loss = Callable[..., Any]  # loss(params, *args) -> scalar


@recorded
def check_grad(loss: Loss, params: ArrayTree, *args, grad=None, x64: bool = True,
               mode: str = "auto", method: str = "central", eps: float | None = None,
               rtol: float | None = None, atol: float | None = None,
               samples: int = DEFAULT_SAMPLES, seed: int = 0,
               memory_budget: int | None = None, progress: bool | None = None,
               has_aux: bool = False, evaluator: str = "auto") -> Report:
    """Checks a gradient of `loss` against finite differences and jax.grad, leaf by leaf.

    Args:
      loss: `loss(params, *args) -> scalar`, in JAX or NumPy.
      params: any pytree. Floating-point and complex array leaves are checked; other leaves
        (ints, bools, None, strings, callables) are held fixed and reported as "skipped". A
        complex leaf is checked along the real and the imaginary direction of each entry, and
        its gradient is read in JAX's convention, dL/dx - i dL/dy (what jax.grad returns); a
        gradient in the other convention (PyTorch's .grad) is diagnosed as "conjugate".
      *args: passed to `loss` (and `grad`) unchanged, never perturbed: data, labels, a PRNG key.
      grad: the gradient to check: a function `grad(params, *args)` (JAX or NumPy) returning a
        pytree shaped like params, a ready pytree, or a flat vector in `ravel_pytree` order. With
        None, jax.grad(loss) is checked (this is how custom_vjp/custom_jvp rules are tested).
      x64: evaluate in float64 (default). The global setting is restored afterwards, even when
        the check raises. With False, the check runs at the parameters' own precision.
      mode: "full" checks every entry. "sample" checks `samples` seeded entries per leaf.
        "directional" tests random directions per leaf and, where one fails, finds the wrong
        entries by group testing (O(log n) evaluations): for models too large for "full".
        "auto" (default) starts a full check and times its first stencil after compilation;
        it switches to "directional" plus a sample only when the full check would take over 5 s
        and longer than directional mode, saying so in the report.
      method: "central" (default): central differences, 2 loss evaluations per entry (4 at
        reduced precision, where every entry is also evaluated at 2h). "richardson":
        extrapolation from h, 2h and 4h with a larger step, 6 evaluations per entry (3x the
        cost) for about one more correct digit; worth it in float32. "complex": the complex
        step, exact to rounding for complex-analytic losses (refused for others).
      eps: a fixed absolute step. None (default) picks u**(1/3)·max(1,|θ|) per entry.
      rtol: with atol, overrides the error model: an entry fails when
        |g - num| > atol + rtol·|num|.
      atol: see rtol.
      samples: entries per leaf in mode "sample".
      seed: seeds the sample and the directions.
      memory_budget: bytes for one batch of perturbed evaluations (default: a quarter of the
        available memory, between 256 MiB and 1 GiB); chunks are sized to fit it.
      progress: show a progress bar on long checks (None: when stderr is a terminal or in a
        notebook; it appears only for checks predicted to take over 2 s).
      has_aux: the loss returns (value, aux), as for jax.value_and_grad(..., has_aux=True);
        aux is ignored. A gradient function may then return (grad, aux) too.
      evaluator: "auto" (default): a float64 loss of at least 20,000 parameters takes the
        structured pass, which recomputes only what each perturbation changes, leaf by leaf where
        that does less work (the report's notes say which leaves). "dense": the whole loss is
        evaluated for every perturbation. Both agree to rounding.

    Returns:
      A frozen `Report`: `.ok`, `.leaves` (per-leaf status, worst entry, pattern),
      `.global_rel_error`, `.diagnosis`; `print(report)` shows the table.

    Raises:
      InputError (a ValueError): on inputs jgc cannot check, with a message naming the leaf or
        argument and the fix.

    Examples:
      >>> import jax.numpy as jnp, jgc
      >>> loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2)
      >>> p, x = {"w": jnp.ones(3) * 0.1}, jnp.arange(6.0).reshape(2, 3)
      >>> jgc.check_grad(loss, p, x, grad=lambda p, x: {"w": 2 * p["w"]}).ok
      False
      >>> jgc.check_grad(loss, p, x).ok  # grad=None: checks jax.grad itself
      True
    """
    calls.require_function(loss)
    with precision(x64) as prec:
        options = make_options(x64=x64, mode=mode, method=method, eps=eps, rtol=rtol,
                               atol=atol, samples=samples, seed=seed,
                               memory_budget=memory_budget, progress=progress,
                               has_aux=has_aux, evaluator=evaluator)
        subject = Subject(loss, params, args, given=(("grad", grad),), has_aux=has_aux)
        return pipeline.run(subject, grad, options, prec)


def _chex_asserts_enabled() -> bool:
    """Whether chex assertions are on (chex.disable_asserts() turns them off): a public chex
    assertion that must fail tells, without reading chex's private flag."""
    try:
        chex.assert_equal(0, 1)
    except AssertionError:
        return True
    return False


def assert_grad(loss: Loss, params: ArrayTree, *args, grad=None,
                allow_unresolved: bool = False, **options) -> Report | None:
    """Like `check_grad`, but raises AssertionError naming every bad leaf when the check fails.

    A chex-style assertion for test suites: the message starts with "[jgc] " and contains the
    diagnosis and the full report table. Returns the Report when the check passes. A leaf that
    finite differences could not resolve fails the assertion too (nothing was verified
    there), unless `allow_unresolved=True`; mismatches always fail it. Like every chex
    assertion it honours `chex.disable_asserts()`: then it checks nothing and returns None.

    Examples:
      >>> import jax.numpy as jnp, jgc
      >>> _ = jgc.assert_grad(lambda p: jnp.sum(p ** 3), jnp.arange(3.0),
      ...                     grad=lambda p: 3 * p ** 2)
    """
    if not _chex_asserts_enabled():
        return None
    report = check_grad(loss, params, *args, grad=grad, **options)
    if report.ok or (allow_unresolved and report.verdict == Verdict.UNRESOLVED):
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

    Examples:
      >>> import jax.numpy as jnp, jgc
      >>> g = jgc.numerical_grad(lambda p: jnp.sum(p["a"] ** 2), {"a": jnp.array([1.0, -2.0])})
      >>> [round(float(v), 6) for v in g["a"]]
      [2.0, -4.0]
    """
    calls.require_function(loss)
    with precision(x64) as prec:
        options = make_options(x64=x64, method=method, eps=eps, has_aux=has_aux)
        return pipeline.numerical_grad(Subject(loss, params, args, has_aux=has_aux), options,
                                       prec)
