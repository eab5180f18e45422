"""Verdict quality: how often is the verdict right, and is the right leaf named?

A corpus of random networks (depth, widths, activation, loss, batch size, seed), each checked in
float64 (x64=True) and float32 (x64=False), with the correct gradient and with planted bugs in
one leaf: constant factors (2, 1/2, 4, m, 1/m, and 1.01 for the 1% requirement), a sign flip, a
transpose (square leaves), a missing regularisation term, an all-zero gradient, and one wrong
entry. Three rules judge the same numbers:

  * jgc: check_grad's verdict and bad leaves;
  * classic: the seeds' single number ||g - n|| / (||g|| + ||n||) < 1e-7 (CS231n), no leaves;
  * torch: torch.autograd.gradcheck's rule, |g - n| <= 1e-5 + 1e-3 |n| for every entry, leaves
    named by where it fails.

For classic and torch, n is the same central difference jgc uses (jgc.numerical_grad).

Run: python benchmarks/verdict_quality.py [--cases 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

import jgc

ACTIVATIONS = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu,
               "softplus": jax.nn.softplus, "gelu": jax.nn.gelu}
REG = 0.05


def make_loss(activation: str, kind: str):
    act = ACTIVATIONS[activation]

    def loss(params, X, Y):
        h = X
        for i, layer in enumerate(params):
            h = h @ layer["W"] + layer["b"]
            if i < len(params) - 1:
                h = act(h)
        if kind == "mse":
            return 0.5 * jnp.mean(jnp.sum((h - Y) ** 2, axis=1))
        logp = jax.nn.log_softmax(h)
        ce = -jnp.mean(jnp.sum(logp * Y, axis=1))
        return ce + 0.5 * REG * sum(jnp.sum(layer["W"] ** 2) for layer in params)

    return loss


LOSSES = {(a, k): make_loss(a, k) for a in ACTIVATIONS for k in ("mse", "ce")}


def make_case(rng: np.random.Generator):
    depth = int(rng.integers(1, 4))
    widths = [int(rng.integers(2, 9)) for _ in range(depth + 1)]
    if rng.random() < 0.5:  # a square layer, so that a transpose bug is possible
        widths[1] = widths[0]
    m = int(rng.integers(4, 17))
    activation = str(rng.choice(list(ACTIVATIONS)))
    kind = str(rng.choice(["mse", "ce"]))
    params = [{"W": rng.normal(size=(a, b)) / np.sqrt(a), "b": 0.1 * rng.normal(size=b)}
              for a, b in zip(widths[:-1], widths[1:])]
    X = rng.normal(size=(m, widths[0]))
    if kind == "mse":
        Y = rng.normal(size=(m, widths[-1]))
    else:
        Y = np.eye(widths[-1])[rng.integers(0, widths[-1], size=m)]
    name = f"{activation}-{kind}-" + "x".join(map(str, widths)) + f"-m{m}"
    return name, LOSSES[(activation, kind)], params, (X, Y), m, kind


def bugs_for(g, params, m, kind, rng):
    """(name, buggy gradient, wrong paths, expected pattern) for one random leaf each."""
    paths = [(i, k) for i in range(len(g)) for k in ("W", "b")]

    def with_leaf(i, k, value):
        out = [dict(layer) for layer in g]
        out[i][k] = value
        return out

    def pick(cond=lambda i, k: True):
        choices = [p for p in paths if cond(*p)]
        return choices[int(rng.integers(len(choices)))] if choices else None

    out = []
    for factor, label in ((2.0, "x2"), (0.5, "x1/2"), (4.0, "x4"), (m, "xm"), (1 / m, "x1/m"),
                          (1.01, "x1.01")):
        i, k = pick()
        out.append((label, with_leaf(i, k, g[i][k] * factor), [(i, k)], "scale"))
    i, k = pick()
    out.append(("sign", with_leaf(i, k, -g[i][k]), [(i, k)], "sign"))
    sq = pick(lambda i, k: k == "W" and g[i][k].shape[0] == g[i][k].shape[1]
              and not np.allclose(g[i][k], g[i][k].T))
    if sq:
        i, k = sq
        out.append(("transpose", with_leaf(i, k, g[i][k].T), [(i, k)], "transpose"))
    i = int(rng.integers(len(g)))
    if kind == "ce":  # the loss has 0.5·REG·ΣW²: leave its gradient out
        out.append(("reg missing", with_leaf(i, "W", g[i]["W"] - REG * params[i]["W"]),
                    [(i, "W")], "regularization"))
    else:  # a regularisation term the loss does not have
        out.append(("reg extra", with_leaf(i, "W", g[i]["W"] + REG * params[i]["W"]),
                    [(i, "W")], "regularization"))
    i, k = pick()
    out.append(("zero", with_leaf(i, k, np.zeros_like(g[i][k])), [(i, k)], "zero"))
    i, k = pick()
    one = np.array(g[i][k], copy=True)
    j = np.unravel_index(int(np.argmax(np.abs(one))), one.shape)
    one[j] *= 1.5
    out.append(("one entry", with_leaf(i, k, one), [(i, k)], None))
    return [(n, b, {f"[{i}]['{k}']" for i, k in w}, p) for n, b, w, p in out]


def leaf_errors(g, num):
    return {f"[{i}]['{k}']": (np.asarray(g[i][k], np.float64).ravel(),
                              np.asarray(num[i][k], np.float64).ravel())
            for i in range(len(g)) for k in ("W", "b")}


def classic_ok(errors):
    a = np.concatenate([v[0] for v in errors.values()])
    b = np.concatenate([v[1] for v in errors.values()])
    return np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b)) < 1e-7


def torch_bad(errors):
    return {p for p, (a, b) in errors.items() if np.any(np.abs(a - b) > 1e-5 + 1e-3 * np.abs(b))}


def run(cases: int, seed: int, method: str = "central") -> None:
    rng = np.random.default_rng(seed)
    tallies = {dt: {rule: collections.Counter() for rule in ("jgc", "classic", "torch")}
               for dt in ("float64", "float32")}
    start = time.perf_counter()
    for _ in range(cases):
        name, loss, params, args, m, kind = make_case(rng)
        for dt, x64 in (("float64", True), ("float32", False)):
            cast = (lambda v: np.asarray(v, np.float32)) if not x64 else np.asarray
            p = jax.tree_util.tree_map(cast, params)
            a = tuple(cast(v) for v in args)
            with jax.enable_x64(x64):
                g = jax.tree_util.tree_map(np.asarray, jax.jit(jax.grad(loss))(p, *a))
            num = jgc.numerical_grad(loss, p, *a, x64=x64)
            variants = [("correct", g, set(), None)] + bugs_for(g, p, m, kind, rng)
            for bug, grad, wrong, pattern in variants:
                t = tallies[dt]
                r = jgc.check_grad(loss, p, *a, grad=grad, x64=x64, method=method)
                named = {leaf.path for leaf in r.bad_leaves}
                errors = leaf_errors(grad, num)
                verdicts = {"jgc": (r.ok, named),
                            "classic": (classic_ok(errors), None),
                            "torch": (not torch_bad(errors), torch_bad(errors))}
                for rule, (ok, leaves) in verdicts.items():
                    c = t[rule]
                    if bug == "correct":
                        c["correct cases"] += 1
                        c["false alarms"] += not ok
                    else:
                        c["bug cases"] += 1
                        c["bugs caught"] += not ok
                        if bug == "x1.01":
                            c["1% bugs"] += 1
                            c["1% bugs caught"] += not ok
                        if leaves is not None and not ok:
                            c["wrong leaves named"] += leaves != wrong
                    c["right verdicts"] += ok == (bug == "correct")
                    if rule == "jgc" and bug == "x1.01":
                        leaf = next(x for x in r.leaves if x.path in wrong)
                        resolvable = leaf.resolution is not None and leaf.resolution <= 0.01
                        c["1% bugs resolvable"] += resolvable
                        c["1% resolvable caught"] += resolvable and not ok
                    c["cases"] += 1
                if bug != "correct" and pattern is not None and not r.ok:
                    t["jgc"]["patterns expected"] += 1
                    t["jgc"]["patterns recognised"] += all(
                        leaf.pattern == pattern for leaf in r.bad_leaves)
    seconds = time.perf_counter() - start
    print(f"verdict quality: {cases} random networks x 2 precisions, method={method}, "
          f"{seconds:.0f} s, jax {jax.__version__}, jgc {jgc.__version__}\n")
    for dt, t in tallies.items():
        print(f"{dt} (x64={dt == 'float64'}):")
        print(f"  {'rule':8s} {'right verdicts':>16s} {'false alarms':>14s} {'bugs caught':>13s} "
              f"{'1% bugs caught':>15s} {'wrong leaves named':>19s} {'patterns':>10s}")
        for rule, c in t.items():
            def pct(a, b, c=c):
                return f"{100 * c[a] / max(c[b], 1):.1f}%"
            caught = max(c["bugs caught"], 1)
            wrong = ("-" if rule == "classic" else
                     f"{100 * c['wrong leaves named'] / caught:.1f}%")
            pat = pct("patterns recognised", "patterns expected") if rule == "jgc" else "-"
            print(f"  {rule:8s} {pct('right verdicts', 'cases'):>16s} "
                  f"{pct('false alarms', 'correct cases'):>14s} "
                  f"{pct('bugs caught', 'bug cases'):>13s} "
                  f"{pct('1% bugs caught', '1% bugs'):>15s} {wrong:>19s} {pat:>10s}")
        n = t["jgc"]
        print(f"  ({n['correct cases']} correct and {n['bug cases']} planted-bug checks; "
              "'wrong leaves named' is over the bugs each rule caught)")
        print(f"  jgc on 1% bugs in leaves whose resolution (reported per leaf) is 1% or finer: "
              f"{n['1% resolvable caught']} of {n['1% bugs resolvable']} caught; the other "
              f"{n['1% bugs'] - n['1% bugs resolvable']} get a resolution note\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="central", choices=["central", "richardson"])
    args = ap.parse_args()
    run(args.cases, args.seed, args.method)
