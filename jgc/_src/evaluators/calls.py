"""Calling the user's code: one wrapper for every call, and the user's gradient function.

Every call into user code (a loss on the host, a gradient function, a layer's forward or
backward, a forward-mode or Hessian-vector rule) goes through `user_call`, which turns an
exception into an InputError naming what raised, and chains the original, so that the failing
line stays visible. The user's gradient function is called once (`call_gradient`): traced and
compiled when it is JAX code, on the host with NumPy copies otherwise. Whether code is NumPy
(`numpy_code`) and which promotion settings it runs under are read here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jgc._src.evaluators import programs
from jgc._src.evaluators.structured.flatjaxpr import jaxpr_cost
from jgc._src.stages.split import (
    InputError,
    Split,
    match_gradient,
)


def user_call(what: str, fn: Callable, *args, context: str = "", **kwargs):
    """fn(*args, **kwargs), with any exception turned into InputError("<what> raised T: e").

    `context` is appended on a new line (where the call happened, e.g. the perturbed entry),
    and so is what to do when the user's JAX configuration forbids a promotion in the code
    (`promotion_advice`). InputError from nested jgc calls passes through unchanged.
    """
    try:
        return fn(*args, **kwargs)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the user's code raises
        text = str(e).rstrip()
        advice = promotion_advice(e)
        raise InputError(f"{what} raised {type(e).__name__}: {text}"
                         + (f"\n  {context}" if context else "")
                         + (f"\n  {advice}" if advice else "")) from e


def first_line(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def is_function(grad) -> bool:
    """A gradient *function*, as opposed to a ready gradient pytree. Equinox modules are
    callable pytrees: one that holds arrays is a ready gradient (eqx.filter_grad returns one)."""
    return callable(grad) and not any(
        isinstance(x, (np.ndarray, np.generic, jax.Array))
        for x in jax.tree_util.tree_leaves(grad))


def require_function(fn, name: str = "loss", signature: str = "(params, *args) -> scalar",
                     call: str = "check_grad(loss, params, *args, grad=...)") -> None:
    if not callable(fn):
        raise InputError(f"{name} must be a function {name}{signature}, but got a "
                         f"{type(fn).__name__}. Did you pass the arguments in the wrong order? "
                         f"The signature is {call}.")


# -- the user's promotion settings --------------------------------------------------------------

# The two strict JAX options, as JAX's errors spell them: (the option as the user sets it, what
# the code promotes, how to make it explicit, the option's default).
_STRICT = {
    "jax_numpy_rank_promotion='raise'": (
        "jax_numpy_rank_promotion='raise'", "rank",
        "for instance b[None, :] or jnp.expand_dims(b, 0) to add a bias of shape (n,) to a "
        "batch of shape (m, n)", "'allow'"),
    "jax_numpy_dtype_promotion=strict": (
        "jax_numpy_dtype_promotion='strict'", "dtype",
        "for instance x.astype(y.dtype) where arrays of two dtypes meet", "'standard'"),
}
STRICT_PROMOTION = (
    "That is an implicit {kind} promotion, which your JAX configuration forbids ({option}). "
    "jgc runs your code under your own configuration, as jax.jit or jax.grad would, and does "
    "not relax it: make the promotion explicit ({fix}), or set the option back to {default}.")
STRICT_X64 = (
    " Here a float32 value meets a float64 one: x64=True (the default) evaluates a float32 model "
    "in float64, where a float32 value made inside your code (a constant, an array created with "
    "dtype=float32) meets the promoted ones; x64=False checks it at its own precision.")


def forbidden_promotion(error: BaseException | None) -> str | None:
    """The option under which `error` (or an exception it was raised from) is JAX refusing an
    implicit promotion in strict mode: the key of _STRICT, or None for any other error."""
    while error is not None:
        for option in _STRICT:
            if option in str(error):
                return option
        error = error.__cause__
    return None


def promotion_advice(error: BaseException) -> str | None:
    """What to do when user code raised `error` because the user's JAX configuration forbids an
    implicit promotion in it; None when `error` is anything else. A float32 value meeting a
    float64 one under x64 is likely from jgc's promotion of a float32 model (STRICT_X64)."""
    found = forbidden_promotion(error)
    if found is None:
        return None
    option, kind, fix, default = _STRICT[found]
    text = STRICT_PROMOTION.format(kind=kind, option=option, fix=fix, default=default)
    if kind == "dtype" and jax.config.jax_enable_x64 and all(
            f"'{name}'" in str(error) for name in ("float32", "float64")):
        text += STRICT_X64
    return text


def promotion_refused(what: str, error: BaseException) -> InputError | None:
    """The InputError for user code (`what`: "loss", "grad(params, *args)") that raised `error`
    because the user's JAX configuration forbids an implicit promotion in it, or None for any
    other error. The caller chains `error`, so that its line shows."""
    advice = promotion_advice(error)
    return None if advice is None else InputError(
        f"{what} raised {first_line(error)}\n  {advice}")


# -- the user's gradient function ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GradStatic:
    """The static part of a program over the flat vector's segments (its key, with the trace)."""

    segments: tuple[tuple[int, int, str], ...]


@dataclasses.dataclass
class GradientCall:
    """What calling the user's gradient function showed: its output, and how it was called."""

    out: Any
    note: str | None = None  # how it was called, when worth saying
    mutated: tuple[str, ...] = ()  # arrays it changed in place (on the host copies)


def call_gradient(ev, fn: Callable, what: str = "grad(params, *args)") -> GradientCall:
    """fn(params, *args) at theta, called once.

    JAX code is traced once and run compiled: run eagerly, every primitive compiles on its own
    (a 20-16-3 MLP's hand-written jnp backprop took 1.0 s eagerly against 0.2 s traced and
    compiled, in a fresh process). NumPy code is called on the host with NumPy copies (it may
    assign into its inputs). Which is which is read from the code (`numpy_code`) before the
    call, so that either runs exactly once; a function whose code does not tell (a callable
    object, a lambda over helpers of both) is traced first, and called on the host only if JAX
    cannot trace it, which the report's note then says.
    """
    note = None
    if ev.traceable and not numpy_code(fn):
        try:
            traced = programs.trace(lambda *flat: fn(*ev.call_args(flat)), *ev.avals())
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - not traceable: NumPy copies below.
            refused = promotion_refused(what, e)  # the user's error: the host would hide it
            if refused is not None:
                raise refused from e
            where = _user_line(e)
            note = (f"{what} is not traceable by JAX (it converts its inputs to NumPy"
                    f"{' at ' + where if where else ''}), so jgc called it on the host with "
                    "NumPy copies; JAX's tracer had run it up to that point first")
        else:
            consts = [jax.device_put(c) for c in traced.consts]
            segments = GradStatic(ev.segments)

            def build():
                def run(consts, theta, dynamic):
                    parts = [theta[a:b] for a, b, _ in segments.segments]
                    return traced.evaluate(consts, *parts, *dynamic)

                return run

            program = programs.compiled("call", build, segments, (traced,),
                                        (consts, ev.theta, ev.dyn),
                                        work=jaxpr_cost(traced.closed))
            flat = user_call(what, program, consts, ev.theta, ev.dyn)
            return GradientCall(jax.tree_util.tree_unflatten(traced.out_tree, flat))
    params, args = ev.host_inputs()
    before = _fingerprints((params, args))
    out = user_call(what, fn, params, *args)
    after = _fingerprints((params, args))
    mutated = tuple(("params" if p.startswith("[0]") else "args") + p[3:]
                    for p in before if before[p] != after.get(p))
    return GradientCall(out, note, mutated)


def numpy_code(fn, depth: int = 3) -> bool:
    """Whether fn's code refers to NumPy and never to JAX: read from the names its code (and
    the functions it calls, `depth` levels down) looks up in its globals and closure, without
    calling it. False when it cannot tell (a callable object, a builtin)."""
    found: set[str] = set()
    _code_refs(fn, depth, found, set())
    return found == {"numpy"}


def _code_refs(fn, depth: int, found: set, seen: set) -> None:
    fn = inspect.unwrap(getattr(fn, "func", fn))  # functools.partial, functools.wraps
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen:
        found.add("unknown" if code is None else "")
        return
    seen.add(id(code))
    names = dict(getattr(fn, "__globals__", {}))
    for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        with contextlib.suppress(ValueError):  # an empty cell
            names[var] = cell.cell_contents
    codes = [code]
    while codes:
        c = codes.pop()
        codes += [k for k in c.co_consts if inspect.iscode(k)]
        for name in (*c.co_names, *c.co_freevars):
            if name in names:
                _classify(names[name], depth, found, seen)


def _classify(obj, depth: int, found: set, seen: set) -> None:
    module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    if top in ("jax", "jaxlib", "flax", "equinox", "optax", "haiku") or isinstance(
            obj, jax.Array):
        found.add("jax")
    elif top == "numpy" or isinstance(obj, np.ndarray):
        found.add("numpy")
    elif inspect.isfunction(obj) and depth > 0:
        _code_refs(obj, depth - 1, found, seen)


def _user_line(error: BaseException) -> str:
    """'file.py:12' of the innermost frame of the user's code in a traceback, or ''."""
    frame = _user_frame(error)
    if frame is None:
        return ""
    return f"{frame.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.tb_lineno}"


def _fingerprints(tree) -> dict[str, bytes]:
    """Byte copies of every NumPy array leaf, by path: to see whether a function mutated them."""
    return {jax.tree_util.keystr(p): np.asarray(x).tobytes()
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, np.ndarray)}


def mutation_note(call: GradientCall | None, what: str = "grad(params, *args)") -> str | None:
    """grad(params, *args) on the host gets copies; if it changed them, say which."""
    if call is None or not call.mutated:
        return None
    return (f"{what} modified its inputs in place ({', '.join(call.mutated[:5])}). jgc passed "
            "it copies, so your arrays are intact, but in training this corrupts the "
            "parameters or data: make the gradient function return new arrays")


def without_aux(out, sp: Split, params, has_aux: bool):
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
