"""What naming the wrong rule costs, against the failing check that triggers it (issue 23).

Each model is an MLP at sizes from about 1k to about 1.6M parameters, checked with
check_grad(loss, params, X) and grad=None, which finds jax.grad wrong and localises it
(report.rule); the localisation's cost is report.rule.seconds, and the failing check's own cost
is the rest of the check's wall time. The goal (issue 23) is at most 3x. Two bugs:

  rule   the hidden activation is jgc.examples' softplus, whose custom_vjp backward is 2x too
         large, called from a layer function inside a jitted block (three calls deep). Custom
         rules are checked first, so this is the cheapest case.
  sweep  every rule is right, but the output layer's bias is used through a piecewise
         where(b == 0, 0, b * t) at b = 0: every equation is checked locally before the
         boundary is found, the most expensive case.

A second run of the same check measures the warm cost (the equations' programs compiled, as
when a user re-runs the check after a fix); the first run includes compilation.

Run: python benchmarks/localize.py [--quick]   (--quick: the two smallest sizes)
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jgc
from jgc.examples._nets import _softplus as softplus  # its backward rule is 2x


def layer(w, b, x, act):
    return act(x @ w + b[None, :])


@partial(jax.jit, static_argnums=2)
def block(p, x, act=softplus):
    return layer(p["W2"], p["b2"], layer(p["W1"], p["b1"], x, act), act)


def loss(p, x):
    return jnp.mean(block(p, x) @ p["W3"])


def loss_sweep(p, x):
    out = block(p, x, jnp.tanh) @ p["W3"]
    b = p["b3"]
    return jnp.mean(out) + jnp.sum(jnp.where(b == 0.0, 0.0, b * jnp.mean(out)))


SIZES = ((16, 32), (64, 128), (256, 256), (512, 1024))


def model(d: int, h: int, batch: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = {"W1": rng.normal(size=(d, h)) / np.sqrt(d), "b1": 0.1 * rng.normal(size=h),
         "W2": rng.normal(size=(h, h)) / np.sqrt(h), "b2": 0.1 * rng.normal(size=h),
         "W3": rng.normal(size=(h, 1)) / np.sqrt(h), "b3": np.zeros(1)}
    return p, rng.normal(size=(batch, d))


def run(d: int, h: int, kind: str) -> tuple:
    p, x = model(d, h)
    n = sum(v.size for v in p.values())
    out = []
    for _ in range(2):  # cold, then warm
        start = time.perf_counter()
        report = jgc.check_grad(loss if kind == "rule" else loss_sweep, p, x)
        total = time.perf_counter() - start
        rule = report.rule
        expected = "_softplus_bwd" if kind == "rule" else "eq"
        assert rule is not None and rule.found and rule.name == expected, str(report)
        out.append((total - rule.seconds, rule.seconds, report.mode))
    return n, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    sizes = SIZES[:2] if ap.parse_args().quick else SIZES
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; check_grad(grad=None) of an MLP; "
          "rule: a custom_vjp 2x wrong three calls deep; sweep: a where at its boundary "
          "(every equation checked first)")
    print(f"{'bug':<6} {'params':>9}  {'mode':<11} {'check s':>8} {'localise s':>10} "
          f"{'ratio':>6}   {'warm check':>10} {'warm loc.':>9} {'ratio':>6}")
    for kind in ("rule", "sweep"):
        for d, h in sizes:
            n, ((c0, l0, mode), (c1, l1, _)) = run(d, h, kind)
            print(f"{kind:<6} {n:>9}  {mode:<11} {c0:>8.2f} {l0:>10.2f} {l0 / c0:>6.2f}   "
                  f"{c1:>10.2f} {l1:>9.2f} {l1 / c1:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
