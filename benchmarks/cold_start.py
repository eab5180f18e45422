"""Cold start: the first check of a tiny network in a fresh process, with and without the
persistent compilation cache (`jgc.enable_compilation_cache`, here via JGC_COMPILATION_CACHE).

Workload: W1, tanh MLP 20-16-3, batch 8, float64 (387 parameters), with its NumPy gradient;
mode="full". Each figure is the median of --repeats fresh processes, imports excluded:

  * no cache: what every process pays today (XLA compiles the loss batch and jax.grad);
  * cache, cold: the first process with an empty cache directory (compiles and writes);
  * cache, warm: later processes (read instead of compiling);
  * the NumPy loop (CS231n's, every entry) on the same network, for scale.

Run: python benchmarks/cold_start.py [--repeats 5]
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
import json, time
from jgc.examples import zoo
import jgc
model = zoo.mlp((20, 16, 3), batch=8)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    plain = {k: v for k, v in os.environ.items() if k != "JGC_COMPILATION_CACHE"}
    os.environ.clear()
    os.environ.update(plain)
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
