"""`check_vjp`: a layer's hand-written backward, checked the CS231n way.

A layer y = f(x1, x2, ...) with a hand-written backward (dy -> dx1, dx2, ...) is checked by
contracting its output with a cotangent c: the scalar L(x) = sum(f(x) * c) has gradient
vjp(c, x), so the whole check_grad pipeline applies with params = primals.

Complex primals, outputs and cotangents follow JAX's convention: the VJP is the transpose of
the JVP under the real pairing <a, b> = Re(sum(a * b)) (no conjugation), so the contraction is
L(x) = Re(sum(f(x) * c)), whose gradient in JAX's convention (df/dx - i df/dy, per complex
input entry) is exactly vjp(c, x): Re(c * jvp(t)) = Re(vjp(c) * t) for every tangent t. For a
holomorphic f that is vjp(c) = c * f'(z), as jax.vjp returns it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jgc._src.evaluators import calls
from jgc._src.report.report import Report
from jgc._src.stages import pipeline
from jgc._src.stages import plan as pl
from jgc._src.stages.prepare import Subject, precision
from jgc._src.stages.split import InputError, explicitly_promoted, tree_pformat
from jgc._src.surfaces.options import make_options
from jgc._src.surfaces.recording import recorded


def _contract(out, cot):
    """Re(sum(out * cot)) over the leaves, each product in the dtypes' promoted dtype (cast
    explicitly: strict promotion has no implicit path from a float32 output to a float64
    cotangent)."""
    leaves_o, leaves_c = jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(cot)
    pairs = (explicitly_promoted(o, c) for o, c in zip(leaves_o, leaves_c))
    return sum((o * c).real.sum() for o, c in pairs)


def _call(fn, primals, *first):
    """fn(*first, *primals), or fn(*first, **primals) when the primals are a dict."""
    if isinstance(primals, dict):
        return fn(*first, **primals)
    return fn(*first, *primals)


def _contracted_loss(f: Callable) -> Callable:
    """loss(primals, cot) = <f(*primals), cot>."""
    return lambda primals, cot: _contract(_call(f, primals), cot)


def _vjp_as_grad(f_vjp: Callable, primals) -> Callable:
    """grad(primals, cot) = f_vjp(cot, *primals), shaped like the primals: a tuple with one
    gradient per primal (a NamedTuple of them for NamedTuple primals), or a dict for dict
    primals (a tuple in the dict's order is accepted too)."""
    n, names = len(primals), list(primals) if isinstance(primals, dict) else None

    def grad(p, cot):  # called like a gradient function: the caller names what raised
        out = _call(f_vjp, p, cot)
        if names is not None and isinstance(out, dict):
            return out
        if n == 1 and not isinstance(out, (tuple, list)):
            out = (out,)  # A one-input layer may return its gradient bare.
        if not isinstance(out, (tuple, list)) or len(out) != n:
            got = (f"a {type(out).__name__} of length {len(out)}"
                   if isinstance(out, (tuple, list)) else f"a {type(out).__name__}")
            want = "a dict with the primals' keys, or a tuple" if names else "a tuple"
            raise InputError(f"f_vjp(cotangent, *primals) must return {want} with one "
                             f"gradient per primal ({n}), but returned {got}.")
        if names is not None:
            return dict(zip(names, out))
        return type(p)(*out) if _is_namedtuple(p) else tuple(out)

    return grad


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


@recorded
def check_vjp(f: Callable, f_vjp: Callable | None, primals, cotangent=None, *,
              x64: bool = True, seed: int = 0, **options) -> Report:
    """Checks a hand-written backward `f_vjp` of `f` against finite differences and jax.

    Args:
      f: the forward, `f(*primals) -> array` (or a pytree of arrays), in JAX or NumPy.
      f_vjp: the backward, `f_vjp(cotangent, *primals) -> tuple` with one gradient per primal.
        A CS231n-style `layer_backward(dout, cache)` wraps into this in one line:
        `lambda dout, x, w: layer_backward(dout, layer_forward(x, w)[1])`. With None, jax's own
        VJP of f is checked (how a custom_vjp rule on f is tested).
      primals: the inputs of f: a tuple (leaves named "[0]", "[1]", ...), a NamedTuple (".x",
        ".w") or a dict, passed as keyword arguments (f(**primals), f_vjp(cotangent,
        **primals); leaves named "['x']", "['w']"). A single array is taken as a 1-tuple.
      cotangent: the output cotangent to contract with; None draws a seeded standard normal
        (complex, with independent real and imaginary parts, for a complex output).
        Complex primals, outputs and cotangents follow JAX's convention (the module doc): for
        a holomorphic f, f_vjp(c, z) = c * f'(z), as jax.vjp gives; a VJP written as
        conj(c) * f'(z) or conj(c * f'(z)) is diagnosed as "conjugate".
      x64: as for `check_grad`.
      seed: seeds the random cotangent, and the sample and directions as for `check_grad`.
      **options: as for `check_grad` (mode, eps, rtol, atol, samples, evaluator).

    Returns:
      A Report whose leaves are the primals, named by their position, field or key.

    Examples:
      >>> import numpy as np, jgc
      >>> f = lambda x, w: x @ w
      >>> f_vjp = lambda dy, x, w: (dy @ w.T, x.T @ dy)
      >>> rng = np.random.default_rng(0)
      >>> jgc.check_vjp(f, f_vjp, (rng.normal(size=(2, 3)), rng.normal(size=(3, 4)))).ok
      True
    """
    calls.require_function(f, "f", "(*primals) -> out", "check_vjp(f, f_vjp, primals, ...)")
    if f_vjp is not None and not callable(f_vjp):
        raise InputError(f"f_vjp must be a function f_vjp(cotangent, *primals) -> tuple, or None "
                         f"to check jax's VJP of f; got a {type(f_vjp).__name__}.")
    if isinstance(primals, list):
        primals = tuple(primals)
    elif not isinstance(primals, (tuple, dict)):
        primals = (primals,)
    with precision(x64) as prec:
        opts = make_options(**_with_defaults(options, seed), x64=x64)
        out = calls.user_call("f(*primals)", _call, f, primals,
                              context=f"primals: {tree_pformat(primals)}")
        given = cotangent is not None
        if given:
            _check_cotangent(out, cotangent)
        else:
            cotangent = _random_cotangent(out, seed, x64)
        # The loss is a sum of mixed-sign terms and may cancel to ~0; its rounding error scales
        # with sum |f * c|, not |sum f * c|, so that is the magnitude the error model uses.
        f_scale = float(sum((np.abs(np.asarray(o)) * np.abs(np.asarray(c))).sum()
                            for o, c in zip(jax.tree_util.tree_leaves(out),
                                            jax.tree_util.tree_leaves(cotangent))))
        grad = None if f_vjp is None else _vjp_as_grad(f_vjp, primals)
        subject = Subject(_contracted_loss(f), primals, (cotangent,), name="primals",
                          fn_name="f(*primals) contracted with the cotangent",
                          directions=(("cotangent", cotangent),) if given else (),
                          f_scale=f_scale)
        return pipeline.run(subject, grad, opts, prec, what="f_vjp(cotangent, *primals)")


def _with_defaults(options: dict, seed: int) -> dict:
    opts = dict(mode="auto", method="central", eps=None, rtol=None, atol=None,
                samples=pl.DEFAULT_SAMPLES, seed=seed, memory_budget=None, progress=None)
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"check_vjp() got unexpected options {sorted(unknown)}; the options are "
                        f"{sorted(opts)} and x64.")
    opts.update(options)
    return opts


def _random_cotangent(out, seed: int, x64: bool):
    """A seeded standard normal cotangent shaped like f's output, in its precision: real for a
    real output, complex (independent real and imaginary parts) for a complex one."""
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(o) for o in jax.tree_util.tree_leaves(out)]
    floats = [o.dtype for o in leaves if jnp.issubdtype(o.dtype, jnp.inexact)]
    real = pl.eval_dtype(str(np.result_type(*floats)) if floats else "float64", x64)

    def draw(o):
        shape = np.shape(o)
        if np.iscomplexobj(o):
            c = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
            return c.astype(np.result_type(real, np.complex64))
        return rng.standard_normal(shape).astype(real)

    return jax.tree_util.tree_map(draw, out)


def _check_cotangent(out, cot) -> None:
    so = [np.shape(o) for o in jax.tree_util.tree_leaves(out)]
    sc = [np.shape(c) for c in jax.tree_util.tree_leaves(cot)]
    if so != sc:
        raise InputError(f"cotangent must be shaped like f's output: f returned "
                         f"{tree_pformat(out)}, the cotangent is {tree_pformat(cot)}. Pass "
                         "cotangent=None to draw a random one.")
