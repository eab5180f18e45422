"""The rules suite: jgc on jax's own differentiation rules, where they are right.

What is measured. Each case is one of jax's built-in rules (lax primitives, jax.numpy compound
functions, jax.scipy.special, linear algebra), the op lists and input domains taken from jax's own
tests at the tag jax-v0.10.2 (tests/lax_autodiff_test.py, lax_numpy_test.py,
lax_scipy_special_functions_test.py, lax_scipy_test.py, linalg_test.py, eigh_test.py): the same
samplers (rand_default, rand_positive, ... re-implemented below under jax's names) and, where
jax's test leaves the op's domain or sits on a pole, a narrower range with the reason stated. Each
case runs in float64 (x64=True, float64 inputs) and float32 (x64=False, float32 inputs) through
all four surfaces, every one checking jax's own derivative (no hand-written rule):

  grad  check_grad(loss, primals), loss = Σ real(f(x))·c (+ Σ imag(f(x))·c') with a fixed
        N(0, 1) c per output: a scalar loss that reaches every output element;
  jvp   check_jvp(f, None, primals);
  vjp   check_vjp(f, None, primals);
  hvp   check_hvp(loss, primals), skipped (with the reason) where the second derivative is not
        defined or not meaningful.

Every rule of the ordinary cases is right at its inputs, so each outcome is one of: ok;
unresolved (verdict "unresolved", an honest "cannot tell", with the diagnosis's first line); false
alarm (any other non-ok verdict); crash (an exception other than jgc.InputError, or over the
per-check time limit of TIME_LIMIT_S, raised by SIGALRM once control is back in Python); refusal
(jgc.InputError, with its first line); skipped (H·v only). The labelled points (point_cases) are
known-interesting, each verified outside jgc: where jax's derivative is wrong (on the surfaces the
label names) a non-ok verdict is a true detection and ok is "missed"; elsewhere the point is
stationary, a tie, an underflow or beyond what finite differences resolve, and the label says
what a correct checker should say. For every refusal and crash, the same derivative is computed
with plain jax: if that works the line says SUSPICIOUS, else it quotes jax's own error.

A case's float32 checks run after its float64 ones in the same process (jax 0.10.2's
enable_x64 switching has a bug of its own: see special.owens_t in the results).

Run: python benchmarks/verdict_quality.py --suite rules [--quick] [--only NAME] [--verbose]
  --quick    every fourth case, about 1.5 minutes; the full suite takes about 8 minutes on 2
             cores, 100 s of it special.hyp2f1 (compile-bound).
  --only     the cases whose name contains NAME; --verbose prints the full report of every
             check that is not ok (a repro of one line: --only NAME --verbose).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.special as sp
import numpy as np
from jax import lax

import jgc

SURFACES = ("grad", "jvp", "vjp", "hvp")
PRECISIONS = (("float64", np.float64, True), ("float32", np.float32, False))
CATEGORIES = ("ok", "unresolved", "false alarm", "true detection", "missed", "crash", "refusal",
              "skipped")
TIME_LIMIT_S = 60  # per check; a check over it is a crash ("timed out")


# -- inputs: jax's samplers (jax/_src/test_util.py), named as there ----------------------------

@dataclasses.dataclass(frozen=True)
class Draw:
    """One input: how it is drawn (float64; a float32 check casts it) and its stated domain."""

    text: str
    make: Callable[[np.random.Generator], np.ndarray]

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(self.make(rng), np.float64)


def default(*shape, scale=3.0) -> Draw:
    return Draw(f"rand_default N(0,{scale:g}²)", lambda r: scale * r.standard_normal(shape))


def small(*shape) -> Draw:
    return Draw("rand_small N(0,1e-3²)", lambda r: 1e-3 * r.standard_normal(shape))


def positive(*shape) -> Draw:
    return Draw("rand_positive [1,3)", lambda r: 1 + 2 * r.random(shape))


def small_positive(*shape) -> Draw:
    return Draw("rand_small_positive [0,2e-5)", lambda r: 2e-5 * r.random(shape))


def uniform(lo: float, hi: float, *shape) -> Draw:
    return Draw(f"rand_uniform [{lo:g},{hi:g})", lambda r: lo + (hi - lo) * r.random(shape))


def not_small(*shape, offset=10.0) -> Draw:
    def make(r):
        x = 3 * r.standard_normal(shape)
        return x + np.where(x > 0, offset, -offset)
    return Draw(f"rand_not_small |x|>{offset:g}", make)


def unique(*shape) -> Draw:
    """Distinct integers (rand_unique_int): max, sort and top_k without ties."""
    n = int(np.prod(shape))
    return Draw("rand_unique_int (no ties)", lambda r: r.permutation(n).reshape(shape) - n / 2)


def fixed(value, text: str) -> Draw:
    return Draw(text, lambda r: np.asarray(value, np.float64))


def spd(n: int) -> Draw:
    """a·aᵀ with a of shape (n, 2n), as linalg_test's testCholesky."""
    def make(r):
        a = 3 * r.standard_normal((n, 2 * n))
        return a @ a.T
    return Draw("a·aᵀ, a (n,2n) rand_default (SPD)", make)


def _resampled(make, ok, r):
    while True:
        a = make(r)
        if ok(a):
            return a


def invertible(n: int, m: int | None = None) -> Draw:
    """rand_default, redrawn until well conditioned (cond < 30): inside the op's domain."""
    shape = (n, m or n)
    return Draw("rand_default, cond<30 (invertible)",
                lambda r: _resampled(lambda r: 3 * r.standard_normal(shape),
                                     lambda a: np.linalg.cond(a) < 30, r))


def symmetric_gapped(n: int) -> Draw:
    """(a + aᵀ)/2 with eigenvalues at least 0.5 apart: eigenvectors are smooth there."""
    def make(r):
        a = 3 * r.standard_normal((n, n))
        return (a + a.T) / 2
    return Draw("(a+aᵀ)/2 rand_default, eigenvalue gaps>0.5 (distinct)",
                lambda r: _resampled(make, lambda a: np.diff(np.linalg.eigvalsh(a)).min() > 0.5,
                                     r))


def gapped(n: int, m: int) -> Draw:
    """rand_default with singular values at least 0.5 apart and above 0.5 (distinct)."""
    def ok(a):
        s = np.linalg.svd(a, compute_uv=False)
        return np.diff(s[::-1]).min() > 0.5 and s.min() > 0.5
    return Draw("rand_default, singular values distinct (gaps>0.5)",
                lambda r: _resampled(lambda r: 3 * r.standard_normal((n, m)), ok, r))


# -- cases ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Label:
    """What a correct checker should say at a known-interesting point."""

    text: str
    wrong: tuple[str, ...] = ()  # the surfaces whose jax derivative is wrong here


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    f: Callable  # f(*primals): float primals only; integer and boolean operands are closed over
    draws: tuple[Draw, ...]
    why: str = ""  # the domain's reason, where not obvious
    no_hvp: str = ""  # why the H·v check is skipped ("" runs it)
    label: Label | None = None
    precisions: tuple[str, ...] = ("float64", "float32")

    @property
    def domain(self) -> str:
        text = "; ".join(d.text for d in self.draws)
        return f"{text} ({self.why})" if self.why else text


def case(name, f, *draws, why="", no_hvp="", label=None, precisions=("float64", "float32")):
    return Case(name, f, tuple(draws), why, no_hvp, label, precisions)


def _dot(lhs, rhs, dims):
    return lax.dot_general(lhs, rhs, dims, precision=lax.Precision.HIGHEST)


def _conv(lhs, rhs, **kw):
    return lax.conv_general_dilated(lhs, rhs, precision=lax.Precision.HIGHEST, **kw)


def _reduce_window(op, init: float):
    """A monoid reduce_window (a Python scalar init: jax differentiates only those)."""
    return lambda x: lax.reduce_window(x, init, op, (2, 2), (1, 1), "SAME")


_GATHER = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                     start_index_map=(0,))
_SCATTER = lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                       scatter_dims_to_operand_dims=(0,))


def _rem_operands(r):
    """x = q·y with q at least 0.3 from an integer: rem jumps where x/y is one."""
    y = 1 + r.random(6)
    q = r.integers(1, 4, 6) + 0.3 + 0.4 * r.random(6)
    return np.stack([q * y, y])


def _normalizing_eigh(a):
    """eigh with each eigenvector's first component made positive (eigh_test.py)."""
    w, v = jnp.linalg.eigh(a, symmetrize_input=True)
    return w, v * jnp.sign(v[..., :1, :])


def _normalizing_svd(a):
    """svd with each left singular vector's first component made positive (linalg_test.py)."""
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    sign = jnp.sign(u[..., :1, :])
    return u * sign, s, vt * jnp.swapaxes(sign, -1, -2)


def _normalizing_qr(a):
    """qr with r's diagonal made positive: the unique factorisation, smooth in a."""
    q, r = jnp.linalg.qr(a)
    d = jnp.sign(jnp.diagonal(r))
    return q * d, r * d[:, None]


def _eig_squared(a):
    """eig's values and right vectors squared (linalg_test.py testEigGradRealInputs: dgeev does
    not pin the eigenvectors' sign)."""
    w, v = lax.linalg.eig(a, compute_left_eigenvectors=False, enable_eigvec_derivs=True)
    return w, v * v


def lax_cases() -> list[Case]:
    """lax_autodiff_test.py: LAX_GRAD_OPS and the structural ops' tests, with their samplers."""
    away = "away from integers: the derivative is 0 there"
    return [
        case("lax.neg", lax.neg, default(6)),
        case("lax.floor", lax.floor, uniform(0.1, 0.4, 6), why=away),
        case("lax.ceil", lax.ceil, uniform(0.1, 0.4, 6), why=away),
        case("lax.round", lax.round, uniform(0.1, 0.4, 6), why=away),
        case("lax.exp", lax.exp, small(6)),
        case("lax.exp2", lax.exp2, small(6)),
        case("lax.expm1", lax.expm1, default(6)),
        case("lax.log", lax.log, positive(6)),
        case("lax.log1p", lax.log1p, positive(6)),
        case("lax.sinh", lax.sinh, default(6)),
        case("lax.cosh", lax.cosh, default(6)),
        case("lax.tanh", lax.tanh, default(6)),
        case("lax.sin", lax.sin, default(6)),
        case("lax.cos", lax.cos, default(6)),
        case("lax.tan", lax.tan, uniform(-1.3, 1.3, 6), why="inside the poles at ±π/2"),
        case("lax.asin", lax.asin, uniform(-0.9, 0.9, 6),
             why="domain: jax's test draws [-1.3,1.3), outside [-1,1]"),
        case("lax.acos", lax.acos, uniform(-0.9, 0.9, 6),
             why="domain: jax's test draws [-1.3,1.3), outside [-1,1]"),
        case("lax.atan", lax.atan, default(6)),
        case("lax.atan2", lax.atan2, default(2, 3), default(2, 3)),
        case("lax.erf", lax.erf, small(6)),
        case("lax.erfc", lax.erfc, small(6)),
        case("lax.erf_inv", lax.erf_inv, small(6)),
        case("lax.bessel_i0e", lax.bessel_i0e, default(6)),
        case("lax.bessel_i1e", lax.bessel_i1e, default(6)),
        case("lax.abs", lax.abs, positive(6), why="away from the kink at 0"),
        case("lax.pow", lax.pow, positive(2, 3), positive(2, 3)),
        case("lax.sqrt", lax.sqrt, positive(6)),
        case("lax.rsqrt", lax.rsqrt, positive(6)),
        case("lax.cbrt", lax.cbrt, not_small(6), why="away from the cusp at 0"),
        case("lax.logistic", lax.logistic, default(6)),
        case("lax.integer_pow(3)", lambda x: lax.integer_pow(x, 3), default(6)),
        case("lax.add", lax.add, default(2, 3), default(2, 3)),
        case("lax.sub", lax.sub, default(2, 3), default(2, 3)),
        case("lax.mul", lax.mul, default(2, 3), default(2, 3)),
        case("lax.div", lax.div, default(2, 3), not_small(2, 3), why="divisor off 0"),
        case("lax.max", lax.max, default(2, 3), default(2, 3)),
        case("lax.min", lax.min, default(2, 3), default(2, 3)),
        case("lax.rem", lambda xy: lax.rem(xy[0], xy[1]),
             Draw("x=q·y, y [1,2), q ∈ Z+[0.3,0.7) (x/y off the jumps)", _rem_operands)),
        case("lax.clamp", lambda b: lax.clamp(b[0], b[1], b[2]),
             Draw("rows x-10, x, x+10, x rand_default (testClampGrad)",
                  lambda r: 3 * r.standard_normal(4) + np.array([[-10], [0], [10]]))),
        case("lax.select", lambda t, f: lax.select(np.array([True, False, True, True, False,
                                                             False]), t, f),
             default(6), default(6)),
        case("lax.reduce_sum", lambda x: lax.reduce_sum(x, (0, 2)), default(3, 4, 2)),
        case("lax.reduce_max", lambda x: lax.reduce_max(x, (1,)), unique(3, 4)),
        case("lax.reduce_min", lambda x: lax.reduce_min(x, (0, 1)), unique(3, 4)),
        case("lax.reduce_prod", lambda x: lax.reduce_prod(x, (1,)), default(3, 4, scale=1.0)),
        case("lax.reduce_window add", _reduce_window(lax.add, 0.0), small(4, 6)),
        case("lax.reduce_window max", _reduce_window(lax.max, -np.inf), unique(4, 6)),
        case("lax.cumsum", lambda x: lax.cumsum(x, axis=1, reverse=True), small(3, 4)),
        case("lax.cumprod", lambda x: lax.cumprod(x, axis=1), small(3, 4)),
        case("lax.cummax", lambda x: lax.cummax(x, axis=0), unique(4, 3)),
        case("lax.cumlogsumexp", lambda x: lax.cumlogsumexp(x, axis=1), default(3, 4)),
        case("lax.sort", lambda x: lax.sort(x, dimension=1), unique(3, 5)),
        case("lax.sort_key_val", lambda k, v: lax.sort_key_val(k, v, 0)[1], unique(5),
             default(5), no_hvp="the values' order is piecewise constant in the keys"),
        case("lax.top_k", lambda x: lax.top_k(x, 3)[0], unique(2, 5)),
        case("lax.dot_general (3,2)·(2,4)", lambda a, b: _dot(a, b, (([1], [0]), ([], []))),
             default(3, 2), default(2, 4)),
        case("lax.dot_general batched", lambda a, b: _dot(a, b, (([2], [1]), ([0], [0]))),
             small(3, 3, 2), small(3, 2, 4)),
        case("lax.conv_general_dilated NCHW",
             lambda x, w: _conv(x, w, window_strides=(1, 1), padding="SAME"),
             default(1, 2, 4, 5), default(3, 2, 1, 2)),
        case("lax.conv_general_dilated NHWC groups",
             lambda x, w: _conv(x, w, window_strides=(2, 1), padding=((1, 0), (0, 1)),
                                rhs_dilation=(1, 2), feature_group_count=2,
                                dimension_numbers=("NHWC", "HWIO", "NHWC")),
             default(1, 5, 4, 2), default(1, 2, 1, 4)),
        case("lax.dynamic_slice", lambda x: lax.dynamic_slice(x, (1, 1), (3, 1)), default(5, 3)),
        case("lax.dynamic_update_slice",
             lambda x, u: lax.dynamic_update_slice(x, u, (np.int32(1), np.int32(0))),
             default(5, 3), default(2, 3)),
        case("lax.gather", lambda x: lax.gather(x, np.array([[0], [2], [1]]), _GATHER, (1, 3),
                                                mode="clip"),
             default(10, 5)),
        case("lax.scatter_add", lambda x, y: lax.scatter_add(x, np.array([[0], [2], [2]]), y,
                                                             _SCATTER),
             default(5, 3), default(3, 3)),
        case("lax.scatter", lambda x, y: lax.scatter(x, np.array([[0], [3]]), y, _SCATTER),
             default(5, 3), default(2, 3)),
        case("lax.pad", lambda x, v: lax.pad(x, v, ((1, 2, 1), (-1, 0, 2))),
             small(2, 3), small()),
        case("lax.concatenate", lambda a, b: lax.concatenate([a, b], 1),
             default(2, 3), default(2, 1)),
        case("lax.transpose+reshape", lambda x: lax.reshape(lax.transpose(x, (2, 0, 1)), (6, 4)),
             default(2, 3, 4)),
        case("lax.rev+slice", lambda x: lax.slice(lax.rev(x, (0,)), (1, 0), (5, 3), (2, 1)),
             default(5, 3)),
        case("lax.broadcast_in_dim", lambda x: lax.broadcast_in_dim(x, (2, 3), (0,)),
             default(2)),
    ]


_NAN_AT_01 = np.arange(12).reshape(3, 4) == 1


def jnp_cases() -> list[Case]:
    """lax_numpy_test.py NumpyGradTests (GRAD_TEST_RECORDS and the grad tests after them)."""
    return [
        case("jnp.arcsinh", jnp.arcsinh, positive(6)),
        case("jnp.arccosh", jnp.arccosh, uniform(1.2, 3.0, 6),
             why="off the branch point at 1, which jax's rand_positive [1,3) reaches"),
        case("jnp.arctanh", jnp.arctanh, uniform(-0.9, 0.9, 6)),
        case("jnp.logaddexp", jnp.logaddexp, uniform(-0.9, 0.9, 2, 3), uniform(-0.9, 0.9, 2, 3)),
        case("jnp.logaddexp2", jnp.logaddexp2, uniform(-0.9, 0.9, 2, 3),
             uniform(-0.9, 0.9, 2, 3)),
        case("jnp.sinc", jnp.sinc, default(6)),
        case("jnp.ldexp(x, 3)", lambda x: jnp.ldexp(x, 3), default(6)),
        case("jnp.frexp mantissa", lambda x: jnp.frexp(x)[0], default(6),
             why="generic: the mantissa jumps at powers of 2"),
        case("jnp.take_along_axis", lambda x: jnp.take_along_axis(
            x, np.array([[2, 0, 1, 1]]).T, axis=1), default(4, 3)),
        case("jnp.nanstd", lambda x: jnp.nanstd(jnp.where(_NAN_AT_01, jnp.nan, x)),
             default(3, 4), why="x[0, 1] replaced by NaN (testNanStdGrad)"),
        case("jnp.interp", lambda x, xp, fp: jnp.interp(x, xp, fp),
             uniform(0.1, 0.9, 4), fixed([0.0, 0.35, 0.6, 1.0], "knots off the x's"),
             default(4), no_hvp="piecewise linear in xp: H·v is zero or a kink"),
        case("jnp.linalg.norm", jnp.linalg.norm, default(3, 4)),
        case("jnp.power (negative base, int exponent)", lambda x: jnp.power(x, 3), default(6)),
    ]


_A6 = np.array([1.2, 2.5, 1.7, 2.9, 1.1, 2.2])  # betainc's a and b: rand_positive values
_B6 = np.array([2.8, 1.4, 2.1, 1.05, 2.6, 1.9])


def special_cases() -> list[Case]:
    """lax_scipy_special_functions_test.py JAX_SPECIAL_FUNCTION_RECORDS and lax_scipy_test.py."""
    n2 = np.int32(2)
    return [
        case("special.gammaln", sp.gammaln, positive(6)),
        case("special.digamma", sp.digamma, positive(6)),
        case("special.gamma", sp.gamma, uniform(0.5, 4.0, 6),
             why="off the poles at 0,-1,..., which jax's rand_default reaches"),
        case("special.loggamma", sp.loggamma, positive(6)),
        case("special.beta", sp.beta, positive(6), positive(6)),
        case("special.betaln", sp.betaln, positive(6), positive(6)),
        case("special.betainc(a, b, x) in x", lambda x: sp.betainc(_A6, _B6, x),
             uniform(0.1, 0.9, 6),
             why="x in (0,1), a and b fixed rand_positive: jax has no derivative in a, b"),
        case("special.gammainc", sp.gammainc, positive(6), positive(6),
             no_hvp="jax has no second derivative in a (igamma_grad_a)"),
        case("special.gammaincc", sp.gammaincc, positive(6), positive(6),
             no_hvp="jax has no second derivative in a (igamma_grad_a)"),
        case("special.erf", sp.erf, small_positive(6)),
        case("special.erfc", sp.erfc, small_positive(6)),
        case("special.erfinv", sp.erfinv, small_positive(6)),
        case("special.erfcx", sp.erfcx, default(6)),
        case("special.expit", sp.expit, small_positive(6)),
        case("special.logit", sp.logit, uniform(0.05, 0.95, 6)),
        case("special.xlogy", sp.xlogy, positive(6), positive(6)),
        case("special.xlog1py", sp.xlog1py, default(6), uniform(-0.5, 3.0, 6),
             why="y > -1: jax's rand_default gives log1p(y) = NaN"),
        case("special.entr", sp.entr, uniform(0.1, 3.0, 6), why="x > 0: -x log x"),
        case("special.logsumexp", lambda a: sp.logsumexp(a, axis=1), default(3, 4)),
        case("special.logsumexp(b)", lambda a, b: sp.logsumexp(a, b=b), default(6), positive(6),
             why="b > 0"),
        case("special.zeta", sp.zeta, positive(6), positive(6)),
        case("special.polygamma(2)", lambda x: sp.polygamma(n2, x), positive(6)),
        case("special.i0", sp.i0, default(6)),
        case("special.i0e", sp.i0e, not_small(6, offset=0.1)),
        case("special.i1", sp.i1, default(6)),
        case("special.i1e", sp.i1e, default(6)),
        case("special.ndtr", sp.ndtr, default(6)),
        case("special.ndtri", sp.ndtri, uniform(0.05, 0.95, 6),
             why="off 0 and 1, where ndtri' is infinite"),
        case("special.log_ndtr", sp.log_ndtr, default(6)),
        case("special.expi", sp.expi, not_small(6, offset=0.1)),
        case("special.exp1", sp.exp1, positive(6)),
        case("special.expn(3)", lambda x: sp.expn(3, x), positive(6)),
        case("special.kl_div", sp.kl_div, positive(6), positive(6)),
        case("special.rel_entr", sp.rel_entr, positive(6), positive(6)),
        case("special.owens_t", sp.owens_t, default(6), default(6)),
        case("special.poch", sp.poch, positive(6), positive(6)),
        case("special.hyp1f1", sp.hyp1f1, uniform(0.5, 3.0, 4), uniform(0.5, 3.0, 4),
             uniform(0.5, 3.0, 4), why="[0.5,3) not [0.5,30): float32 overflows"),
        case("special.hyp2f1", sp.hyp2f1, *(uniform(0.1, 0.9, 2),) * 4),
        case("special.boxcox", sp.boxcox, positive(6), positive(6)),
        case("special.boxcox1p", sp.boxcox1p, uniform(-0.5, 5.0, 6), positive(6)),
        case("special.dawsn", sp.dawsn, default(6)),
        case("special.sici", sp.sici, uniform(0.5, 9.0, 6),
             why="x > 0: ci has a log singularity at 0"),
        case("special.fresnel", sp.fresnel, default(6),
             why="|x| ≲ 9: jax's scale-30 draws oscillate faster than a float32 step"),
        case("special.spence", sp.spence,
             Draw("[0.1,0.9) and [2.1,3)", lambda r: np.r_[0.1 + 0.8 * r.random(3),
                                                           2.1 + 0.9 * r.random(3)]),
             why="off [1,2], where jax's gradient is wrong: see the points"),
        case("special.factorial", sp.factorial, uniform(0.5, 4.0, 6), why="x > 0"),
        case("special.log_softmax", lambda x: jax.nn.log_softmax(x, axis=1), default(3, 4)),
        case("special.softmax", lambda x: jax.nn.softmax(x, axis=1), default(3, 4)),
    ]


_NO_EIG_HVP = "jax raises: eig's second derivative needs enable_eigvec_derivs"


def linalg_cases() -> list[Case]:
    """linalg_test.py and eigh_test.py's gradient tests (small sizes)."""
    return [
        case("linalg.cholesky", jnp.linalg.cholesky, spd(4)),
        case("linalg.inv", jnp.linalg.inv, invertible(4)),
        case("linalg.det", jnp.linalg.det, invertible(3)),
        case("linalg.slogdet", jnp.linalg.slogdet, invertible(4)),
        case("linalg.solve", jnp.linalg.solve, invertible(4), default(4, 2)),
        case("linalg.eigh (normalised)", _normalizing_eigh, symmetric_gapped(4)),
        case("linalg.eigvalsh", jnp.linalg.eigvalsh, symmetric_gapped(4)),
        case("linalg.svd (values)", lambda a: jnp.linalg.svd(a, compute_uv=False), gapped(4, 3)),
        case("linalg.svd (normalised)", _normalizing_svd, gapped(4, 3)),
        case("linalg.qr (positive diagonal)", _normalizing_qr, invertible(4, 3)),
        case("linalg.eigvals", jnp.linalg.eigvals, invertible(4), precisions=("float64",),
             no_hvp=_NO_EIG_HVP),
        case("linalg.eig (vectors squared)", _eig_squared, invertible(4),
             precisions=("float64",)),
        case("linalg.expm", jsl.expm, Draw("rand_small scaled to |a|₁=0.9 (testExpmGrad)",
                                            lambda r: _unit(r.standard_normal((4, 4))) * 0.9)),
        case("linalg.lu", lambda a: jsl.lu(a)[1:], invertible(4), why="distinct pivots"),
        case("linalg.triangular_solve",
             lambda a, b: lax.linalg.triangular_solve(a, b, left_side=True, lower=True),
             Draw("tril(rand_default + 5I) (testTriangularSolveGrad)",
                  lambda r: np.tril(3 * r.standard_normal((4, 4)) + 5 * np.eye(4))),
             default(4, 2)),
        case("linalg.pinv", jnp.linalg.pinv, gapped(4, 3)),
        case("linalg.cho_solve", lambda a, b: jsl.cho_solve(jsl.cho_factor((a + a.T) / 2), b),
             spd(3), default(3, 2), why="a symmetrised: cho_factor reads one triangle"),
        case("linalg.matrix_power(3)", lambda a: jnp.linalg.matrix_power(a, 3), default(3, 3)),
    ]


def _unit(a):
    return a / np.abs(a).sum(axis=0).max()


# -- the labelled points -----------------------------------------------------------------------

_WRONG = "jax's rule is wrong here: a non-ok verdict naming it is right"
_ZERO = "exact zero gradient: ok or an honest unresolved"
_REVERSE = ("grad", "vjp", "hvp")  # jax's reverse mode (and forward-over-reverse)
_ALL = SURFACES


def point_cases() -> list[Case]:
    """Known-interesting points, each verified against a reference outside jgc (finite
    differences in float64 or the closed form)."""
    a, b0 = [0.3, -1.2, 0.7], [1.5, 0.0, 2.0]
    return [
        case("point: logsumexp(a, b) with b[1] = 0", lambda a, b: sp.logsumexp(a, b=b),
             fixed(a, "a"), fixed(b0, "b with a zero entry"),
             label=Label(f"{_WRONG} ([1]): d/db[1] is exp(a[1])/Σ = 0.0498, jax gives 0", _ALL)),
        case("point: spence on (1, 2)", sp.spence, fixed([1.2, 1.8], "1.2, 1.8"),
             label=Label(f"{_WRONG} in reverse mode: jax.grad is NaN (log(1-x) in an unselected "
                         "jnp.where branch), jax.jvp is right (log(x)/(1-x))", _REVERSE)),
        case("point: spence at 1", sp.spence, fixed([1.0], "1"),
             label=Label(f"{_WRONG}: jax's derivative is 0 (a constant branch at x == 1), the "
                         "true one -1", _ALL)),
        case("point: cho_solve(cho_factor(a)) unsymmetrised",
             lambda a, b: jsl.cho_solve(jsl.cho_factor(a), b), spd(3), default(3, 2),
             label=Label(f"{_WRONG}: the function reads one triangle of a, jax's rule assumes "
                         "symmetric tangents (d/da[0,2] -0.35 vs -0.39, d/da[2,0] -0.04 vs 0)",
                         _ALL)),
        case("point: det of a rank-1 3x3 (corank 2)", jnp.linalg.det,
             fixed([[36, -42, 18], [-42, 49, -21], [18, -21, 9]],
                   "testDetGradOfSingularMatrixCorank2"),
             label=Label(f"loss exactly 0, {_ZERO} (the adjugate of corank 2 is 0)")),
        case("point: det of a rank-2 3x3 (corank 1)", jnp.linalg.det,
             fixed([[50, -30, 45], [-30, 90, -81], [45, -81, 81]],
                   "testDetGradOfSingularMatrixCorank1"),
             label=Label("loss 0, gradient (the adjugate) nonzero and right: ok")),
        case("point: sin at pi/2", jnp.sin, fixed([np.pi / 2], "π/2 (stationary)"),
             label=Label(f"stationary: {_ZERO}; H·v (-1): ok")),
        case("point: cos at pi", jnp.cos, fixed([np.pi], "π (stationary)"),
             label=Label(f"stationary: {_ZERO}; H·v (+1): ok")),
        case("point: erf at 10", sp.erf, fixed([10.0], "10 (erf' = 4.2e-44)"),
             label=Label("gradient 4.2e-44 (0 in float32): ok or an honest unresolved")),
        case("point: log_sigmoid at 0", jax.nn.log_sigmoid, fixed([0.0], "0"),
             label=Label("smooth (a tie inside logaddexp(x, 0)), rule right (0.5): ok")),
        case("point: lax.rem JVP in the divisor", lambda y: lax.rem(5.3, y),
             fixed([2.1], "y = 2.1, x = 5.3 (x/y = 2.52)"),
             label=Label("rule right (-trunc(x/y) = -2): ok")),
        case("point: xlogy at x = 0", sp.xlogy, fixed([0.0], "x = 0"), fixed([3.0], "y = 3"),
             label=Label("rule right (log 3 and 0; testGradOfXlogyAtZero): ok")),
        case("point: logaddexp at a tie", jnp.logaddexp, fixed([0.4], "x = 0.4"),
             fixed([0.4], "y = 0.4 (tie)"),
             label=Label("smooth at the tie, rule right (0.5, 0.5): ok")),
        case("point: expn(jnp.asarray(2), x)", lambda x: sp.expn(jnp.asarray(2), x),
             uniform(0.5, 2.5, 3),
             label=Label("rule right (-E1(x)); plain jax.grad and jax.jvp work: ok; jax's own "
                         "forward-over-reverse raises (an array in nondiff_argnums): for H·v a "
                         "refusal naming that is right")),
        case("point: fresnel at |x| ~ 44 (float32)", sp.fresnel,
             fixed([44.1, -43.7], "|x| ≈ 44 (period ≈ 0.02 < a float32 step)"),
             precisions=("float32",),
             label=Label("rule right to 1e-7, the function oscillates faster than a float32 "
                         "step: ok or an honest unresolved")),
        case("point: eigvals (float32)", jnp.linalg.eigvals, invertible(4),
             precisions=("float32",), no_hvp=_NO_EIG_HVP,
             label=Label("rule right at float32 accuracy: ok or an honest unresolved")),
        case("point: eig vectors squared (float32)", _eig_squared, invertible(4),
             precisions=("float32",),
             label=Label("rule right at float32 accuracy: ok or an honest unresolved")),
    ]


def all_cases() -> list[Case]:
    return lax_cases() + jnp_cases() + special_cases() + linalg_cases() + point_cases()


# -- running one check -------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    case: Case
    surface: str
    precision: str
    category: str
    verdict: str = ""
    detail: str = ""  # the diagnosis's or the exception's first line
    named: tuple[str, ...] = ()  # the leaves the report names (not ok)
    seconds: float = 0.0
    report: jgc.Report | None = None
    jax_error: str | None = None  # refusals and crashes: "" if plain jax computes the same


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises CheckTimeout in the main thread after `seconds` (once control is back in Python)."""
    def handler(signum, frame):
        raise CheckTimeout(f"timed out after {seconds:g} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def contraction(f: Callable, primals: tuple, dtype, rng: np.random.Generator) -> Callable:
    """loss(primals) = Σ real(out)·c + Σ imag(out)·c' over f's inexact outputs, c ~ N(0, 1)."""
    with jax.enable_x64(dtype == np.float64):
        outs = jax.tree_util.tree_leaves(jax.eval_shape(f, *primals))
    weights = [(rng.standard_normal(o.shape).astype(dtype),
                rng.standard_normal(o.shape).astype(dtype)) for o in outs]

    def loss(p):
        total = 0.0
        for o, (c, c_imag) in zip(jax.tree_util.tree_leaves(f(*p)), weights):
            if not jnp.issubdtype(o.dtype, jnp.inexact):
                continue
            total = total + jnp.sum(jnp.real(o) * c)
            if jnp.iscomplexobj(o):
                total = total + jnp.sum(jnp.imag(o) * c_imag)
        return total

    return loss


def _check(surface: str, c: Case, primals: tuple, loss: Callable, x64: bool) -> jgc.Report:
    if surface == "grad":
        return jgc.check_grad(loss, primals, x64=x64)
    if surface == "jvp":
        return jgc.check_jvp(c.f, None, primals, x64=x64)
    if surface == "vjp":
        return jgc.check_vjp(c.f, None, primals, x64=x64)
    return jgc.check_hvp(loss, primals, x64=x64)


def _first_line(text: str, width: int = 150) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= width else line[:width - 3] + "..."


def summary(r: jgc.Report) -> str:
    """The diagnosis's first line and, when it has one, its first named cause ("- ...")."""
    lines = [x.strip() for x in r.diagnosis.splitlines()]
    cause = next((x[2:] for x in lines if x.startswith("- ")), "")
    return _first_line(r.diagnosis, 90 if cause else 150) + (f" / {_first_line(cause, 110)}"
                                                             if cause else "")


def classify(c: Case, surface: str, r: jgc.Report) -> str:
    if r.verdict == "unresolved":
        return "unresolved"
    if c.label is not None and surface in c.label.wrong:
        return "missed" if r.ok else "true detection"
    return "ok" if r.ok else "false alarm"


def plain_jax(surface: str, c: Case, primals: tuple, loss: Callable, x64: bool) -> str:
    """Whether plain jax computes the derivative the check needed: "" if it does, else its error
    (so that a refusal or crash can be told from jax's own failure)."""
    try:
        with jax.enable_x64(x64):
            if surface == "grad":
                jax.grad(loss)(primals)
            elif surface == "vjp":
                out, pullback = jax.vjp(c.f, *primals)
                pullback(out)
            elif surface == "jvp":
                jax.jvp(c.f, primals, primals)
            else:
                jax.jvp(jax.grad(loss), (primals,), (primals,))
    except Exception as e:  # noqa: BLE001 - jax's own failure is the answer
        return f"{type(e).__name__}: {_first_line(str(e), 90)}"
    return ""


def run_check(c: Case, surface: str, precision: str, primals: tuple, loss: Callable,
              x64: bool) -> Outcome:
    out = Outcome(c, surface, precision, "skipped")
    if surface == "hvp" and c.no_hvp:
        out.detail = c.no_hvp
        return out
    start = time.perf_counter()
    try:
        with time_limit(TIME_LIMIT_S):
            r = _check(surface, c, primals, loss, x64)
    except jgc.InputError as e:
        out.category, out.detail = "refusal", _first_line(str(e))
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        out.category, out.detail = "crash", f"{type(e).__name__}: {_first_line(str(e))}"
    else:
        out.category, out.verdict, out.report = classify(c, surface, r), str(r.verdict), r
        out.detail = summary(r)
        out.named = tuple(x.path for x in r.leaves if not x.ok)
    out.seconds = time.perf_counter() - start
    if out.category in ("refusal", "crash"):
        out.jax_error = plain_jax(surface, c, primals, loss, x64)
    return out


def run_case(c: Case, seed: int) -> list[Outcome]:
    """The case in each of its precisions through the four surfaces."""
    outcomes = []
    for precision, dtype, x64 in PRECISIONS:
        if precision not in c.precisions:
            continue
        rng = np.random.default_rng(seed)
        primals = tuple(d(rng).astype(dtype) for d in c.draws)
        loss = contraction(c.f, primals, dtype, rng)
        outcomes += [run_check(c, s, precision, primals, loss, x64) for s in SURFACES]
    return outcomes


# -- the printed results -----------------------------------------------------------------------

def print_tables(outcomes: list[Outcome]) -> None:
    for precision, _, x64 in PRECISIONS:
        rows = [o for o in outcomes if o.precision == precision]
        n_cases = len({o.case.name for o in rows})
        print(f"{precision} (x64={x64}, {precision} inputs): {n_cases} cases")
        print(f"  {'surface':8s} {'checks':>6s} " + " ".join(f"{c:>14s}" for c in CATEGORIES)
              + f" {'seconds':>8s}")
        for surface in (*SURFACES, "all"):
            sel = [o for o in rows if surface in ("all", o.surface)]
            n = collections.Counter(o.category for o in sel)
            print(f"  {surface:8s} {len(sel):6d} " + " ".join(f"{n[c]:14d}" for c in CATEGORIES)
                  + f" {sum(o.seconds for o in sel):8.1f}")
        print()


def _line(o: Outcome) -> str:
    verdict = o.verdict or o.category
    named = f" [{', '.join(o.named)}]" if o.named else ""
    if o.jax_error is None:
        jax_note = ""
    elif o.jax_error:
        jax_note = f" (plain jax fails too: {o.jax_error})"
    else:
        jax_note = " (SUSPICIOUS: plain jax computes this derivative)"
    return (f"  {o.category:14s} {o.case.name} | {o.surface} | {o.precision} | {verdict}{named}"
            f" | {o.detail}{jax_note}")


def print_lists(outcomes: list[Outcome], verbose: bool) -> None:
    bad = [o for o in outcomes if o.category not in ("ok", "refusal", "skipped")
           and o.case.label is None]
    print(f"Not ok on correct rules at ordinary inputs ({len(bad)}): category case | surface | "
          "precision | verdict [leaves not ok] | first line of the diagnosis or exception")
    for o in sorted(bad, key=lambda o: (o.category, o.case.name, o.surface, o.precision)):
        print(_line(o))
        if verbose and o.report is not None:
            print("\n".join("      " + s for s in str(o.report).splitlines()))
    refusals = [o for o in outcomes if o.category == "refusal"]
    print(f"\nRefusals ({len(refusals)}):")
    for o in refusals:
        print(_line(o))
    points = [o for o in outcomes if o.case.label is not None]
    print(f"\nLabelled points ({len({o.case.name for o in points})}), with what a correct checker "
          "should say:")
    for name in dict.fromkeys(o.case.name for o in points):
        mine = [o for o in points if o.case.name == name]
        print(f"  {name}: {mine[0].case.label.text}")
        for o in mine:
            print("  " + _line(o))
            if verbose and o.report is not None and o.category != "ok":
                print("\n".join("      " + s for s in str(o.report).splitlines()))
    skipped = {(o.case.name, o.detail) for o in outcomes if o.category == "skipped"}
    print(f"\nH·v skipped ({len(skipped)}): " + "; ".join(f"{n} ({d})" for n, d in
                                                         sorted(skipped)))


def print_domains(cases: list[Case]) -> None:
    print("Cases and input domains (jax's samplers; the reason where jax's range is narrowed):")
    for c in cases:
        only = "" if len(c.precisions) == 2 else f" [{', '.join(c.precisions)} only]"
        print(f"  {c.name}{only}: {c.domain}")
    print()


def select(quick: bool, only: str | None) -> list[Case]:
    cases = all_cases()
    if quick:
        cases = cases[::4]
    if only:
        cases = [c for c in cases if only in c.name]
    return cases


def run(quick: bool = False, seed: int = 0, only: str | None = None,
        verbose: bool = False) -> list[Outcome]:
    """Runs the suite and prints the domains, the tables and the lists."""
    cases = select(quick, only)
    start = time.perf_counter()
    outcomes = []
    for c in cases:
        outcomes += run_case(c, seed)
    seconds = time.perf_counter() - start
    print(f"rules suite: {len(cases)} cases{' (--quick: every fourth)' if quick else ''} x "
          f"{len(SURFACES)} surfaces x 2 precisions (jax's own derivatives, default options), "
          f"{seconds:.0f} s, jax {jax.__version__}, jgc {jgc.__version__}\n")
    print_domains(cases)
    print_tables(outcomes)
    print_lists(outcomes, verbose)
    print_slowest(outcomes)
    return outcomes


def print_slowest(outcomes: list[Outcome]) -> None:
    per_case = collections.Counter()
    for o in outcomes:
        per_case[o.case.name] += o.seconds
    print("\nslowest cases (all checks): " + "; ".join(f"{n} {t:.1f} s" for n, t in
                                                      per_case.most_common(5)))
    slow = sorted(outcomes, key=lambda o: -o.seconds)[:3]
    print("slowest checks: " + "; ".join(f"{o.case.name} {o.surface} {o.precision} "
                                        f"{o.seconds:.1f} s" for o in slow))

