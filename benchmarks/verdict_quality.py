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

The framework suite (--suite frameworks) checks real framework models with float32 data (a Flax
CNN, Equinox MLP and conv, an LSTM via lax.scan, attention, LayerNorm and BatchNorm, a relu MLP
at exact kinks, and the 824k-parameter Flax MNIST CNN) with their correct gradient and ten
planted bugs, in both precisions and every mode.

The rules suite (--suite rules, benchmarks/rules.py) checks jax's own differentiation rules (lax,
jax.numpy, jax.scipy.special, linalg) at inputs inside each op's domain, as jax's tests draw them,
through check_grad, check_jvp, check_vjp and check_hvp in both precisions, plus labelled points
where jax's rule is wrong or the point is stationary; --quick runs every fourth case.

The complex suite (--suite complex) checks complex-parameter models written by hand in NumPy and
jax.numpy (jgc.examples.complex_nets), correct and with their own and the generic planted bugs
plus the conjugate (the df/dx + i df/dy convention), in complex64 and complex128, every mode.
"""

from __future__ import annotations

import argparse
import collections
import functools
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


# -- the framework suite ----------------------------------------------------------------------

MODES = ("auto", "full", "sample", "directional")


def planted(g: dict, params: dict, m: int, rng: np.random.Generator):
    """(name, buggy gradient, wrong path, expected pattern): ten real bugs, each in one random
    leaf whose gradient is not zero."""
    paths = [p for p, v in g.items() if np.any(v != 0)]

    def pick(cond=lambda p: True):
        choices = [p for p in paths if cond(p)]
        return choices[int(rng.integers(len(choices)))] if choices else None

    def with_leaf(path, value):
        return {**g, path: np.asarray(value, g[path].dtype)}

    out = []
    for factor, label in ((2.0, "x2"), (0.5, "x1/2"), (m, "xm"), (1 / m, "x1/m"),
                          (1.01, "x1.01")):
        p = pick()
        out.append((label, with_leaf(p, g[p] * factor), p, "scale"))
    p = pick()
    out.append(("sign", with_leaf(p, -g[p]), p, "sign"))
    p = pick()
    out.append(("zero", with_leaf(p, np.zeros_like(g[p])), p, "zero"))
    sq = pick(lambda p: g[p].ndim == 2 and g[p].shape[0] == g[p].shape[1]
              and not np.allclose(g[p], g[p].T))
    if sq:
        out.append(("transpose", with_leaf(sq, g[sq].T), sq, "transpose"))
    else:
        p = pick()
        out.append(("x4", with_leaf(p, g[p] * 4), p, "scale"))
    p = pick(lambda p: np.any(params[p] != 0))
    # The gradient of (lam/2)|theta|^2 is lam * theta, for a complex leaf lam * conj(theta) in
    # JAX's convention (d/dx - i d/dy of (lam/2)(x^2 + y^2)).
    reg = np.conj(params[p]) if np.iscomplexobj(params[p]) else params[p]
    out.append(("reg extra", with_leaf(p, g[p] + 0.05 * reg), p, "regularization"))
    p = pick()
    one = np.array(g[p], copy=True)
    j = np.unravel_index(int(np.argmax(np.abs(one))), one.shape)
    one[j] *= 1.5
    out.append(("one entry", with_leaf(p, one), p, None))
    return out


def _jax_grad(model):
    """jax.grad over the float leaves of the params (as eqx.filter_grad does for a module that
    holds functions), computed at float32 as a user would."""
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    where = [i for i, x in enumerate(leaves)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]

    def f(floats):
        full = list(leaves)
        for i, v in zip(where, floats):
            full[i] = v
        return model.loss(jax.tree_util.tree_unflatten(treedef, full), *model.args)

    g = jax.jit(jax.grad(f))([leaves[i] for i in where])
    full = list(leaves)
    for i, v in zip(where, g):
        full[i] = np.asarray(v)
    return jax.tree_util.tree_unflatten(treedef, full)


def _flat(tree) -> dict:
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in pairs
            if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact)}


def _unflat(tree, flat: dict):
    return jax.tree_util.tree_map_with_path(
        lambda p, v: flat.get(jax.tree_util.keystr(p), v), tree)


def frameworks(seed: int, mnist: bool) -> None:
    """The zoo of framework models (float32 data), each checked with its correct gradient
    (jax.grad at float32, as a user computes it) and ten planted bugs, with default options
    (x64=True, which promotes the data) and with x64=False, in every mode."""
    from jgc.examples import zoo

    rng = np.random.default_rng(seed)
    tallies = {(dt, mode): collections.Counter() for dt in ("float64", "float32")
               for mode in MODES}
    models = [make() for make in zoo.ZOO.values()]
    if mnist:
        models.append(zoo.flax_cnn("mnist"))
    start = time.perf_counter()
    for model in models:
        g_tree = _jax_grad(model)
        g, params = _flat(g_tree), _flat(model.params)
        bugs = planted(g, params, model.batch, rng)
        for dt, x64 in (("float64", True), ("float32", False)):
            for mode in MODES:
                for bug, grad, wrong, pattern in [("correct", g, None, None)] + bugs:
                    _score(tallies[(dt, mode)], f"{model.name} {dt} {mode} {bug}", bug,
                           functools.partial(jgc.check_grad, model.loss, model.params,
                                             *model.args, grad=_unflat(g_tree, grad),
                                             x64=x64, mode=mode),
                           wrong, pattern, mode)
    seconds = time.perf_counter() - start
    print(f"framework suite: {len(models)} models x 2 precisions x {len(MODES)} modes, "
          f"{seconds:.0f} s, jax {jax.__version__}, jgc {jgc.__version__}")
    print("models: " + ", ".join(m.name for m in models) + "\n")
    _table(tallies, {"float64": "float64 (x64=True; float32 data)",
                     "float32": "float32 (x64=False; float32 data)"})


def _score(t: collections.Counter, label: str, bug: str, check, wrong, pattern, mode) -> None:
    """Runs one check and tallies it: a false alarm for bug == "correct", else whether every
    wrong leaf (`wrong`: a path or a tuple of paths) was named, and nothing else, with its
    pattern."""
    t["checks"] += 1
    try:
        r = check()
    except Exception as e:  # noqa: BLE001 - a refused check verifies nothing
        print(f"  error: {label}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        t["errors"] += 1
        t["correct" if bug == "correct" else "bugs"] += 1
        t["false alarms"] += bug == "correct"
        return
    if bug == "correct":
        t["correct"] += 1
        t["false alarms"] += not r.ok
        t["unresolved"] += r.verdict == "unresolved"
        if not r.ok:
            print(f"  false alarm: {label}: {r.verdict} in "
                  f"{[x.path for x in r.leaves if not x.ok]}")
        return
    wrong = {wrong} if isinstance(wrong, str) else set(wrong)
    named = {x.path for x in r.bad_leaves}
    caught = wrong <= named
    t["bugs"] += 1
    t["caught"] += caught
    if not caught or named - wrong:
        status = ", ".join(f"{w} {r.leaf(w).status} resolution {r.leaf(w).resolution}"
                           for w in sorted(wrong))
        print(f"  {'missed' if not caught else 'extra leaves'}: {label} ({status}); "
              f"named {sorted(named)}")
    elif pattern is not None and {r.leaf(w).pattern for w in wrong} != {pattern} and not (
            pattern == "transpose" and mode in ("sample", "directional")):
        print(f"  pattern: {label}: {[(r.leaf(w).pattern, r.leaf(w).factor) for w in wrong]}")
    t["missed"] += r.ok
    t["wrong leaves"] += bool(named - wrong)
    if bug == "x1.01":
        fine = all(r.leaf(w).resolution is not None and r.leaf(w).resolution <= 0.01
                   for w in wrong)
        t["1% resolvable"] += fine
        t["1% resolvable caught"] += fine and caught
    if pattern == "transpose" and mode in ("sample", "directional"):
        pattern = None  # a transpose needs every entry of the leaf
    if pattern is not None and caught:
        t["patterns expected"] += 1
        t["patterns"] += {r.leaf(w).pattern for w in wrong} == {pattern}


def _table(tallies: dict, titles: dict) -> None:
    for dt, title in titles.items():
        print(f"{title}:")
        print(f"  {'mode':12s} {'checks':>7s} {'false alarms':>13s} {'(unresolved)':>13s} "
              f"{'bugs caught':>12s} {'wrong leaves':>13s} {'patterns':>9s} "
              f"{'1% caught where resolvable':>27s}")
        for mode in MODES:
            t = tallies[(dt, mode)]
            pct = lambda a, b, t=t: f"{100 * t[a] / max(t[b], 1):.1f}%"  # noqa: E731
            print(f"  {mode:12s} {t['checks']:7d} {t['false alarms']:>6d} of {t['correct']:<4d}"
                  f" {t['unresolved']:>13d} {pct('caught', 'bugs'):>12s} "
                  f"{pct('wrong leaves', 'caught'):>13s} {pct('patterns', 'patterns expected'):>9s}"
                  f" {t['1% resolvable caught']:>16d} of {t['1% resolvable']:<8d}")
        print()


# -- the complex suite ------------------------------------------------------------------------

def complex_suite(seed: int) -> None:
    """Complex parameters: the hand-written examples of jgc.examples.complex_nets (complex
    least squares, a complex dense layer with modReLU, a Cayley-unitary state preparation), in
    NumPy and in jax.numpy, each with its correct gradient, its own planted bugs and the ten
    generic ones plus a conjugated leaf; and a custom_vjp rule on a complex function with a
    wrong backward (grad=None). complex64 at x64=False and complex128, every mode."""
    from jgc.examples import complex_nets as cn

    rng = np.random.default_rng(seed)
    precisions = (("complex128", np.complex128, True), ("complex64", np.complex64, False))
    tallies = {(name, mode): collections.Counter() for name, _, _ in precisions
               for mode in MODES}
    start, n_models = time.perf_counter(), 0
    for name, make in sorted(cn.COMPLEX.items()):
        for xp in (np, jnp):
            for dt, dtype, x64 in precisions:
                ex = make(xp=xp, dtype=dtype)
                n_models += 1
                g = {k: np.asarray(v) for k, v in ex.grad(ex.params, *ex.args).items()}
                bugs = [(bug, b.grad, tuple(f"{w}" for w in b.wrong), b.pattern)
                        for bug, b in ex.bugs.items()]
                flat = {f"['{k}']": v for k, v in g.items()}
                params = {f"['{k}']": np.asarray(v) for k, v in ex.params.items()}
                generic = planted(flat, params, ex.args[0].shape[0], rng)
                c = [p for p, v in flat.items() if np.iscomplexobj(v) and np.any(v.imag)]
                p = c[int(rng.integers(len(c)))]
                generic.append(("conjugate", {**flat, p: np.conj(flat[p])}, p, "conjugate"))
                bugs += [(bug, {k[2:-2]: v for k, v in grad.items()}, wrong, pattern)
                         for bug, grad, wrong, pattern in generic]
                for mode in MODES:
                    for bug, grad, wrong, pattern in [("correct", ex.grad, None, None)] + bugs:
                        _score(tallies[(dt, mode)],
                               f"{name} {xp.__name__} {dt} {mode} {bug}", bug,
                               functools.partial(jgc.check_grad, ex.loss, ex.params,
                                                 *ex.args, grad=grad, x64=x64, mode=mode),
                               wrong, pattern, mode)
    for dt, dtype, x64 in precisions:
        ex = cn.wrong_complex_custom_vjp(dtype=dtype)
        n_models += 1
        for mode in MODES:
            _score(tallies[(dt, mode)], f"custom_vjp {dt} {mode}", "custom_vjp",
                   functools.partial(jgc.check_grad, ex.loss, ex.params, *ex.args, x64=x64,
                                     mode=mode),
                   "['z']", None, mode)
    seconds = time.perf_counter() - start
    print(f"complex suite: {n_models} models x {len(MODES)} modes, {seconds:.0f} s, "
          f"jax {jax.__version__}, jgc {jgc.__version__}")
    print("models: " + ", ".join(sorted(cn.COMPLEX)) + " (NumPy and jax.numpy), and a wrong "
          "custom_vjp rule\n")
    _table(tallies, {"complex128": "complex128 (x64=True)",
                     "complex64": "complex64 (x64=False)"})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="random",
                    choices=["random", "frameworks", "complex", "rules"])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="central", choices=["central", "richardson"])
    ap.add_argument("--no-mnist", action="store_true",
                    help="frameworks: leave out the 824k-parameter Flax MNIST CNN")
    ap.add_argument("--quick", action="store_true", help="rules: every fourth case")
    ap.add_argument("--only", help="rules: the cases whose name contains this")
    ap.add_argument("--verbose", action="store_true",
                    help="rules: print the full report of every case that is not ok")
    args = ap.parse_args()
    if args.suite == "frameworks":
        frameworks(args.seed, not args.no_mnist)
    elif args.suite == "complex":
        complex_suite(args.seed)
    elif args.suite == "rules":
        import rules  # benchmarks/rules.py, next to this file

        rules.run(quick=args.quick, seed=args.seed, only=args.only, verbose=args.verbose)
    else:
        run(args.cases, args.seed, args.method)
