"""What naming the wrong rule costs, against the failing check that triggers it (issue 23).

Each model is an MLP whose hidden activation is a custom_vjp softplus with a backward rule 2x
too large, called from a layer function inside a jitted block (three calls deep), at sizes from
about 1k to about 1M parameters. check_grad(loss, params, X) with grad=None finds jax.grad
wrong and localises the rule (report.rule); its cost is report.rule.seconds, and the failing
check's own cost is the rest of the check's wall time. The goal (issue 23) is at most 3x.

A second run of the same check measures the warm cost (the equations' programs compiled, as
when a user re-runs the check after a fix); the first run includes compilation.

Run: python benchmarks/localize.py [--quick]   (--quick: the two smallest sizes)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jgc


@jax.custom_vjp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


def softplus_fwd(x):
    return softplus(x), x


def softplus_bwd(x, g):
    return (2.0 * g * jax.nn.sigmoid(x),)  # the planted bug: 2x


softplus.defvjp(softplus_fwd, softplus_bwd)


def layer(w, b, x):
    return softplus(x @ w + b[None, :])


@jax.jit
def block(p, x):
    return layer(p["W2"], p["b2"], layer(p["W1"], p["b1"], x))


def loss(p, x):
    return jnp.mean(block(p, x) @ p["W3"])


SIZES = ((16, 32), (64, 128), (256, 256), (512, 1024), (1000, 900))


def model(d: int, h: int, batch: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = {"W1": rng.normal(size=(d, h)) / np.sqrt(d), "b1": 0.1 * rng.normal(size=h),
         "W2": rng.normal(size=(h, h)) / np.sqrt(h), "b2": 0.1 * rng.normal(size=h),
         "W3": rng.normal(size=(h, 1)) / np.sqrt(h)}
    return p, rng.normal(size=(batch, d))


def run(d: int, h: int) -> tuple:
    p, x = model(d, h)
    n = sum(v.size for v in p.values())
    out = []
    for _ in range(2):  # cold, then warm
        start = time.perf_counter()
        report = jgc.check_grad(loss, p, x)
        total = time.perf_counter() - start
        rule = report.rule
        assert rule is not None and rule.found and rule.name == "softplus_bwd", str(report)
        out.append((total - rule.seconds, rule.seconds, report.mode))
    return n, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    sizes = SIZES[:2] if ap.parse_args().quick else SIZES
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; check_grad(grad=None) of an MLP "
          "with a custom_vjp rule 2x wrong, three calls deep")
    print(f"{'params':>9}  {'mode':<11} {'check s':>8} {'localise s':>10} {'ratio':>6}   "
          f"{'warm check':>10} {'warm loc.':>9} {'ratio':>6}")
    for d, h in sizes:
        n, ((c0, l0, mode), (c1, l1, _)) = run(d, h)
        print(f"{n:>9}  {mode:<11} {c0:>8.2f} {l0:>10.2f} {l0 / c0:>6.2f}   {c1:>10.2f} "
              f"{l1:>9.2f} {l1 / c1:>6.2f}")


if __name__ == "__main__":
    main()
