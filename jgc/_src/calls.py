"""Calling the user's code: one wrapper for every call, and the gradients a check compares.

Every call into user code (a loss on the host, a gradient function, a layer's forward or
backward, a forward-mode or Hessian-vector rule) goes through `user_call`, which turns an
exception into an InputError naming what raised, and chains the original, so that the failing
line stays visible. jax.grad of the loss, and the user's gradient function, are computed here from
the evaluator's single trace of the loss (evaluate.py), not by the evaluator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src import programs, structured
from jgc._src.tree import InputError, Split, explicitly_promoted, flat_output, match_gradient


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


# -- jax.grad of the traced loss -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _GradStatic:
    segments: tuple[tuple[int, int, str], ...]


# A gradient costs a small multiple of the function (the cheap-gradient principle: 3 to 5
# evaluations' work in reverse mode); used for the programs' XLA options (programs.light).
GRAD_WORK = 4.0


def _evaluations(ev):
    """How a differentiating program evaluates the function, in order of preference: the
    check's one trace (every program sees the same function), then the user's function traced
    afresh inside the program, as `jax.jit(jax.grad(loss))` would. The second is for what JAX
    cannot differentiate through a stored trace: a custom_jvp whose rule closes over a value of
    the tracing pass (jax.scipy.special.expn's order, a nondiff_argnums argument), which is a
    dead tracer once that pass has ended."""
    def stored(consts, parts, dynamic):
        return ev.traced.evaluate(consts, *parts, *dynamic)

    def fresh(consts, parts, dynamic):
        del consts  # the fresh trace compiles its own in (the program is keyed on them)
        out = ev.fn_flat(*parts, *dynamic)
        return [out] if not ev.vector else jax.tree_util.tree_leaves(out)

    # A program differentiating through custom rules is keyed on its own trace (programs.py).
    return (("", stored, ev.traced.has_rules), ("_fresh", fresh, True))


def autodiff(ev) -> tuple[np.ndarray | None, str | None, BaseException | None]:
    """jax.grad of the evaluator's traced loss at theta, flat, in the evaluation dtype; or
    (None, why, the exception) when it cannot be taken."""
    if not ev.traceable:
        return None, "the loss is not traceable by JAX", None
    static = _GradStatic(ev.segments)
    failure = None
    for suffix, evaluate, by_program in _evaluations(ev):
        def build(evaluate=evaluate):
            def run(consts, theta, dynamic):
                def f(t):
                    parts = [t[a:b].astype(dt) for a, b, dt in static.segments]
                    (out,) = evaluate(consts, parts, dynamic)
                    return jnp.reshape(out, ())

                return jax.grad(f)(theta)

            return run

        try:
            program = programs.compiled("autodiff" + suffix, build, static, (ev.traced,),
                                        (ev.consts, ev.theta, ev.dyn), work=GRAD_WORK * ev.work,
                                        by_program=by_program)
            g = program(ev.consts, ev.theta, ev.dyn)
        except Exception as e:  # noqa: BLE001 - report why, check the rest.
            failure = e  # the last: jax.grad of the function as the user calls it
            continue
        # In its own dtype: its precision enters the error model.
        return programs.to_host(g), None, None
    return None, f"jax.grad failed: {first_line(failure)}", failure


def autodiff_jvp(ev, tangents: np.ndarray, hessian: bool = False
                 ) -> tuple[np.ndarray | None, str | None]:
    """jax's derivative of the evaluator's traced (vector) function along each row of
    `tangents`: jax.jvp, forward mode. With `hessian` (the function is a gradient), where
    forward mode fails (a custom_vjp rule inside) it is reverse-over-reverse instead:
    grad_theta(F(theta) . v) = H^T v = H v. Returns (values (rows, outputs), None) or
    (None, why)."""
    if not ev.traceable:
        return None, "f is not traceable by JAX"
    static = _GradStatic(ev.segments)
    T = jax.device_put(np.asarray(tangents, ev.dtype))

    def builds(evaluate):
        def f(consts, theta, dynamic):
            parts = [theta[a:b].astype(dt) for a, b, dt in static.segments]
            return flat_output(evaluate(consts, parts, dynamic))

        def forward():
            def run(consts, theta, dynamic, T):
                return jax.vmap(lambda t: jax.jvp(lambda x: f(consts, x, dynamic), (theta,),
                                                  (t,))[1])(T)
            return run

        def reverse():
            def dot(out, t):
                out, t = explicitly_promoted(out, t)
                return out @ t

            def run(consts, theta, dynamic, T):
                return jax.vmap(lambda t: jax.grad(
                    lambda x: dot(f(consts, x, dynamic), t))(theta))(T)
            return run

        return (("jvp", forward), ("rev", reverse)) if hessian else (("jvp", forward),)

    why = None
    for suffix, evaluate, by_program in _evaluations(ev):
        for name, build in builds(evaluate):
            try:
                program = programs.compiled(name + suffix, build, static, (ev.traced,),
                                            (ev.consts, ev.theta, ev.dyn, T),
                                            work=GRAD_WORK * ev.work * len(T),
                                            by_program=by_program)
                # In its own dtype: a float32 product's rounding enters the error model.
                return programs.to_host(program(ev.consts, ev.theta, ev.dyn, T)), None
            except Exception as e:  # noqa: BLE001 - forward mode fails through custom_vjp
                why = why or f"jax.jvp failed: {first_line(e)}"
    return None, why


# -- the user's gradient function ---------------------------------------------------------------

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
            segments = _GradStatic(ev.segments)

            def build():
                def run(consts, theta, dynamic):
                    parts = [theta[a:b] for a, b, _ in segments.segments]
                    return traced.evaluate(consts, *parts, *dynamic)

                return run

            program = programs.compiled("call", build, segments, (traced,),
                                        (consts, ev.theta, ev.dyn),
                                        work=structured.jaxpr_cost(traced.closed))
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


# -- when jax.grad cannot be taken ----------------------------------------------------------

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


def walk(jaxpr):
    """Every equation of a jaxpr, nested ones included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)


def _rule_functions(jaxpr) -> dict:
    """Code objects of the custom_vjp backward rules in a jaxpr (nested ones included)."""
    out = {}
    for eqn in walk(jaxpr):
        f = getattr(eqn.params.get("bwd"), "f", None)
        if eqn.primitive.name == "custom_vjp_call" and hasattr(f, "__code__"):
            out[f.__code__] = f.__name__
    return out


def _callbacks(jaxpr) -> set[str]:
    """Names of the host-callback primitives a jaxpr uses (nested ones included)."""
    return {f"jax.{eqn.primitive.name}" for eqn in walk(jaxpr)
            if "callback" in eqn.primitive.name and eqn.primitive.name != "debug_callback"}


def autodiff_failure(why: str, error: BaseException | None, jaxpr) -> InputError:
    """The error for grad=None when jax.grad itself cannot be computed (`jaxpr`: the loss's
    trace, or None).

    When the failure is inside a custom_vjp backward rule, that rule is what is under test: the
    message says so (and the caller chains the original exception, so its line shows).
    """
    if error is None:
        return InputError(
            f"grad=None asks jgc to check jax.grad, but {why}. Pass your hand-written gradient "
            "as grad= (a function grad(params, *args), a pytree shaped like params, or a flat "
            "vector).")
    text = str(error).splitlines()[0].rstrip(".") if str(error) else ""
    callbacks = _callbacks(jaxpr) if jaxpr is not None else set()
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
        rules = _rule_functions(jaxpr) if jaxpr is not None else {}
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
