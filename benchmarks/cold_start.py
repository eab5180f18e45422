"""Cold start: the first check of a tiny network in a fresh process, with and without the
persistent compilation cache (`jgc.enable_compilation_cache`, here via JGC_COMPILATION_CACHE).

Workload: W1, tanh MLP 20-16-3, batch 8, float64 (387 parameters), with its NumPy gradient;
mode="full". Each figure is the median of --repeats fresh processes, imports excluded:

  * no cache: what every process pays today (XLA compiles the loss batch and jax.grad);
  * cache, cold: the first process with an empty cache directory (compiles and writes);
  * cache, warm: later processes (read instead of compiling);
  * the NumPy loop (CS231n's, every entry) on the same network, for scale.

Run: python benchmarks/cold_start.py [--repeats 5] [--light-sweep] [--compile-options]

--light-sweep times the first check of MLPs of growing size with XLA's full optimisation and
with jgc's light options (forced through programs.compiled's private `forced_light`), against
the predicted work of the dense program: the switch point xla.LIGHT_WORK comes from it.

--compile-options times XLA's compilation of W1's two programs (the loss batch and jax.grad)
under full optimisation and under xla.LIGHT_OPTIONS, with and without each option (the
fastest of 3 compilations each), and the compiled batch's execution time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import functools, json, os, time
from jgc.examples import zoo
import jgc
from jgc._src.evaluators import programs, xla
if os.environ.get("FORCE_LIGHT") in ("0", "1"):  # --light-sweep: both sides of LIGHT_WORK
    programs.compiled = functools.partial(programs.compiled,
                                          forced_light=os.environ["FORCE_LIGHT"] == "1")
sizes = tuple(json.loads(os.environ.get("SIZES", "[20, 16, 3]")))
model = zoo.mlp(sizes, batch=int(os.environ.get("BATCH", "8")))
grad = zoo.mlp_grad(model)
t = time.perf_counter()
r = jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="full",
                   progress=False)
first = time.perf_counter() - t
t = time.perf_counter()
jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="full", progress=False)
print(json.dumps({"first": first, "second": time.perf_counter() - t, "ok": r.ok}))
"""

LOOP = """
import json, time
import numpy as np
from jgc.examples import zoo
model = zoo.mlp((20, 16, 3), batch=8)
p = {k: np.array(v) for k, v in model.params.items()}; X, Y = model.args
def loss():
    h = np.tanh(X @ p["W0"] + p["b0"]); s = h @ p["W1"] + p["b1"]
    s = s - s.max(1, keepdims=True)
    return -(Y * (s - np.log(np.exp(s).sum(1, keepdims=True)))).sum() / len(X)
t = time.perf_counter()
g = zoo.mlp_grad(model)(p, X, Y)
for k, x in p.items():
    for ix in np.ndindex(x.shape):
        old = x[ix]; x[ix] = old + 1e-5; fp = loss(); x[ix] = old - 1e-5; fm = loss(); x[ix] = old
print(json.dumps({"first": time.perf_counter() - t, "second": 0.0, "ok": True}))
"""


def run(code: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env})
    if out.returncode:
        sys.exit(f"a benchmark process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# MLPs of growing work for --light-sweep: (sizes, batch).
SWEEP = [((20, 16, 3), 8), ((50, 32, 10), 16), ((100, 64, 10), 32), ((256, 64, 10), 32),
         ((784, 64, 10), 32), ((784, 128, 10), 64)]


def light_sweep(repeats: int) -> None:
    """The first check's time with XLA's full optimisation and with xla.LIGHT_OPTIONS,
    forced either way (FORCE_LIGHT, read by the child), against the dense program's predicted
    work: where light stops paying is xla.LIGHT_WORK."""
    import jax

    from jgc._src.evaluators.dense import EVALS_PER_ENTRY
    from jgc._src.evaluators.structured.flatjaxpr import jaxpr_cost
    from jgc.examples import zoo

    print(f"first full check in a fresh process (float64, no cache), medians of {repeats}:\n")
    print("| MLP, batch | parameters | predicted work | full optimisation | light | light / full |")
    print("|---|---|---|---|---|---|")
    for sizes, batch in SWEEP:
        model = zoo.mlp(sizes, batch=batch)
        n = sum(v.size for v in model.params.values())
        with jax.enable_x64(True):
            jaxpr = jax.make_jaxpr(model.loss)(model.params, *model.args)
        work = EVALS_PER_ENTRY * n * jaxpr_cost(jaxpr)
        env = {"SIZES": json.dumps(sizes), "BATCH": str(batch)}
        full = statistics.median(run(CHILD, {**env, "FORCE_LIGHT": "0"})["first"]
                                 for _ in range(repeats))
        light = statistics.median(run(CHILD, {**env, "FORCE_LIGHT": "1"})["first"]
                                  for _ in range(repeats))
        print(f"| {'-'.join(map(str, sizes))}, {batch} | {n:,} | {work:.2g} | {full:.3f} s | "
              f"{light:.3f} s | {light / full:.2f} |")


COMPILE_OPTIONS = """
import json, random, time
import jax
from jgc.examples import zoo
import jgc
from jgc._src.evaluators import programs, xla
captured = []
real = programs.compiled
def spy(name, build, static, traced, args, work=None):
    captured.append((name, build, args))
    return real(name, build, static, traced, args, work)
programs.compiled = spy
model = zoo.mlp((20, 16, 3), batch=8)
jgc.check_grad(model.loss, model.params, *model.args, grad=zoo.mlp_grad(model), mode="full",
               progress=False)
light = dict(xla.LIGHT_OPTIONS)
level0 = {k: v for k, v in light.items() if k != "xla_cpu_use_fusion_emitters"}
variants = {"full optimisation": {}, "level 0, no expensive LLVM passes": level0,
            "+ classic emitter (LIGHT_OPTIONS)": light,
            "classic emitter alone": {"xla_cpu_use_fusion_emitters": False}}
rows = []
with jax.enable_x64(True):
    lowered = {name: (jax.jit(build()).lower(*args), args) for name, build, args in captured}
    for label, options in variants.items():
        row = {"variant": label}
        for name, (low, args) in lowered.items():
            times = []
            for _ in range(3):
                # A distinct, inert option value: JAX's in-process cache must not answer.
                o = {**options, "xla_cpu_collective_timeout_seconds": random.randint(10**3, 10**6)}
                t = time.perf_counter()
                program = low.compile(compiler_options=o)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(20):
                jax.block_until_ready(program(*args))
            row[name] = (min(times), (time.perf_counter() - t) / 20)
        rows.append(row)
print(json.dumps(rows))
"""


def compile_options() -> None:
    """XLA compile and execution times of W1's programs under each option set."""
    rows = run(COMPILE_OPTIONS, {})
    names = [k for k in rows[0] if k != "variant"]
    print("W1's programs, compile time (fastest of 3) and execution time per call:\n")
    print("| options | " + " | ".join(f"{n}: compile | {n}: run" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r[n][0] * 1e3:.0f} ms | {r[n][1] * 1e3:.2f} ms" for n in names)
        print(f"| {r['variant']} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--light-sweep", action="store_true",
                    help="measure where light XLA options stop paying (xla.LIGHT_WORK)")
    ap.add_argument("--compile-options", action="store_true",
                    help="time XLA's compilation of W1's programs under each option set")
    args = ap.parse_args()
    plain = {k: v for k, v in os.environ.items()
             if k not in ("JGC_COMPILATION_CACHE", "FORCE_LIGHT")}
    os.environ.clear()
    os.environ.update(plain)
    if args.light_sweep:
        light_sweep(args.repeats)
        return
    if args.compile_options:
        compile_options()
        return
    rows = {"no cache": [run(CHILD, {}) for _ in range(args.repeats)]}
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:  # a fresh, empty cache each time
            cold.append(run(CHILD, {"JGC_COMPILATION_CACHE": d}))
            warm.append(run(CHILD, {"JGC_COMPILATION_CACHE": d}))
    rows["cache, cold (writes)"] = cold
    rows["cache, warm (reads)"] = warm
    rows["NumPy loop, for scale"] = [run(LOOP, {}) for _ in range(args.repeats)]
    print(f"W1 (20-16-3 tanh MLP, 387 parameters), full check, fresh processes, medians of "
          f"{args.repeats}:\n")
    print("| | first check | second check, same process |")
    print("|---|---|---|")
    for name, runs in rows.items():
        first = statistics.median(r["first"] for r in runs)
        second = statistics.median(r["second"] for r in runs)
        print(f"| {name} | {first:.3f} s | {second:.3f} s |")


if __name__ == "__main__":
    main()
