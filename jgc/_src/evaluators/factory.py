"""`make_evaluator`: which strategy evaluates a function (dense, structured or host), chosen once
per check from one trace.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jgc._src.evaluators import programs
from jgc._src.evaluators.calls import first_line, numpy_code, promotion_refused
from jgc._src.evaluators.dense import DenseEvaluator
from jgc._src.evaluators.evaluator import Evaluator
from jgc._src.evaluators.host import HostEvaluator
from jgc._src.evaluators.layout import as_traced, assemble, check_scalar, make_layout
from jgc._src.evaluators.structured.evaluator import STRUCTURED_MIN, StructuredEvaluator
from jgc._src.stages.split import InputError, Split


def make_evaluator(fn: Callable, sp: Split, theta: np.ndarray, dtypes, args: tuple, *,
                   vector: bool = False, has_aux: bool = False,
                   memory_budget: int | None = None, progress=None,
                   name: str = "loss", structured: bool = True) -> Evaluator:
    """The strategy for this function: dense or structured (JAX traces it), or host (it converts
    to NumPy). `structured=False` (the user's evaluator="dense") keeps a traced loss dense.

    The function is traced once, here (no compilation). A loss is checked to return a real
    scalar; an InputError from the function (a pair without has_aux, say) is refused, and any
    other tracing failure means the function is not JAX code: the host loop evaluates it.
    Except an implicit promotion that the user's JAX configuration forbids (strict rank or
    dtype promotion): in JAX code that is the user's error, refused naming `name` (the host
    loop would hide it, or run a JAX loss eagerly); code that uses NumPy alone still runs on
    the host, with NumPy's promotion, as it runs for the user.
    """
    layout, dynamic = make_layout(sp, dtypes, args)
    avals = [jax.ShapeDtypeStruct((sp.offsets[k + 1] - sp.offsets[k],), dt)
             for k, dt in enumerate(dtypes)]
    traced_fn = as_traced(fn, vector, has_aux)

    def flat_fn(*flat):
        k, n_p = len(avals), len(dynamic[0])
        params, rest = assemble(layout, flat[:k], (flat[k:k + n_p], flat[k + n_p:]), cast=False)
        return traced_fn(params, *rest)

    try:
        traced = programs.trace(flat_fn, *avals, *dynamic[0], *dynamic[1])
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use the host loop.
        refused = None if numpy_code(fn) else promotion_refused(name, e)
        if refused is not None:
            raise refused from e
        return HostEvaluator(fn, sp, theta, dtypes, args, vector=vector, has_aux=has_aux,
                             trace_error=first_line(e))
    if not vector:
        (out,) = traced.closed.out_avals
        check_scalar(out.shape, out.dtype)
    kind = DenseEvaluator
    # float64 and float32. (Half precision evaluates in float32 already; see plan.py.) In float32
    # the structured values differ from the dense ones by rounding only, and that rounding is
    # measured like the dense path's, since the noise probes go through the same pass. What
    # once made a 1% bug pass there was the leaf-level test (compare.collective,
    # patterns.resolution), not the structured pass, and it misled the dense path alike.
    if (not vector and sp.n >= STRUCTURED_MIN and structured
            and all(np.dtype(d) in (np.float32, np.float64) for d in dtypes)):
        kind = StructuredEvaluator
    return kind(fn, sp, theta, dtypes, args, traced=traced, vector=vector, has_aux=has_aux,
                memory_budget=memory_budget, progress=progress)
