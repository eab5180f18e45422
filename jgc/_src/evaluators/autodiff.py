"""jax.grad and jax.jvp of the loss, as the third opinion a check compares (stage `compare`).

They are computed from the evaluator's single trace of the loss (evaluators/dense.py), so that
autodiff sees the same function as the finite differences, in programs keyed like every other
(programs.py). `autodiff_failure` words the error when jax.grad itself cannot be taken.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.evaluators import programs
from jgc._src.evaluators.calls import GradStatic, _user_frame, first_line
from jgc._src.stages.split import (
    InputError,
    explicitly_promoted,
    flat_output,
)

# -- jax.grad of the traced loss -----------------------------------------------------------

# A gradient costs a small multiple of the function (the cheap-gradient principle: 3 to 5
# evaluations' work in reverse mode); used for the programs' XLA options (xla.light).
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
    static = GradStatic(ev.segments)
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
    static = GradStatic(ev.segments)
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


# -- when jax.grad cannot be taken ----------------------------------------------------------


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
