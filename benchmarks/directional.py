"""Directional mode at scale: find one wrong entry among 4.2M parameters.

Workload: MLP 3072-1024-1024-10 (tanh), batch 32, float64, n = 4,206,602 parameters. The
hand-written gradient (NumPy backprop) is correct except for one entry of W2, planted. jgc must
name the leaf and the index; each run is timed end to end in a fresh process (imports excluded,
jgc's check module too, which jgc imports on first use; compilation included), and it prints the
estimate of what a full check would cost.

Each run also says where its time went, to tell the machine's variance from jgc's: the user's
gradient function (NumPy backprop on 4.2M parameters), JAX's tracing and XLA's compilation (from
jax.monitoring's duration events), Python's garbage collector (gc.callbacks), and the process's
CPU time against its wall time (a run that waited for the CPU shows it there).

Run: python benchmarks/directional.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CODE = """
import json, time
import numpy as np
rng = np.random.default_rng(0)
sizes = [3072, 1024, 1024, 10]
P = {}
for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    P[f"W{i}"] = rng.normal(size=(a, b)) / np.sqrt(a)
    P[f"b{i}"] = np.zeros(b)
X = rng.normal(size=(32, 3072)); Y = rng.normal(size=(32, 10))
WRONG = ("W1", (517, 33))

def forward(p, X, xp):
    hs = [X]
    for i in range(3):
        z = hs[-1] @ p[f"W{i}"] + p[f"b{i}"]
        hs.append(xp.tanh(z) if i < 2 else z)
    return hs

def np_grad(p, X, Y):
    hs = forward(p, X, np)
    d = (hs[-1] - Y) / len(X)
    g = {}
    for i in reversed(range(3)):
        g[f"W{i}"] = hs[i].T @ d
        g[f"b{i}"] = d.sum(0)
        if i:
            d = (d @ p[f"W{i}"].T) * (1 - hs[i] ** 2)
    g[WRONG[0]][WRONG[1]] += 1e-3  # the planted bug: one entry off by 1e-3
    return g

import gc, os
import jax, jax.numpy as jnp, jgc
def loss(p, X, Y):
    return 0.5 * jnp.sum((forward(p, X, jnp)[-1] - Y) ** 2) / X.shape[0]

phases = {"gradient": 0.0, "trace": 0.0, "compile": 0.0, "gc": 0.0}
def timed_grad(p, X, Y):
    t = time.perf_counter(); out = np_grad(p, X, Y)
    phases["gradient"] += time.perf_counter() - t
    return out
def on_duration(event, seconds, **kw):
    if event.endswith("backend_compile_duration"):
        phases["compile"] += seconds
    elif event.endswith("jaxpr_trace_duration"):
        phases["trace"] += seconds
jax.monitoring.register_event_duration_secs_listener(on_duration)
gc_start = [0.0]
def on_gc(phase, info):
    if phase == "start":
        gc_start[0] = time.perf_counter()
    else:
        phases["gc"] += time.perf_counter() - gc_start[0]
gc.callbacks.append(on_gc)

check = jgc.check_grad  # jgc imports its check on first use: an import, excluded
cpu = os.times(); t = time.perf_counter()
r = check(loss, P, X, Y, grad=timed_grad, mode="directional", progress=False)
sec = time.perf_counter() - t; after = os.times()
phases["cpu"] = (after.user - cpu.user) + (after.system - cpu.system)
bad = r.bad_leaves
print(json.dumps({"seconds": sec, "n": r.n_params, "evals": r.n_evaluations,
                  "leaves": [b.path for b in bad], "phases": phases,
                  "index": list(bad[0].worst_index) if bad and bad[0].worst_index else None,
                  "notes": list(r.notes), "report": str(r)}))
"""


def run() -> dict:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes (median reported)")
    args = ap.parse_args()
    runs = [run() for _ in range(args.runs)]
    res = runs[0]
    print(res["report"], "\n")
    print(f"workload: MLP 3072-1024-1024-10, batch 32, float64, n = {res['n']:,}; one wrong "
          "entry planted at ['W1'][517, 33]")
    for i, r in enumerate(runs):
        found = r["leaves"] == ["['W1']"] and r["index"] == [517, 33]
        ph = r["phases"]
        print(f"  run {i + 1}: {r['seconds']:.2f} s end to end, {r['evals']:,} loss evaluations, "
              f"found the leaf and the index: {found}; user's gradient {ph['gradient']:.2f} s, "
              f"tracing {ph['trace']:.2f} s, XLA compilation {ph['compile']:.2f} s, "
              f"garbage collection {ph['gc']:.2f} s, CPU time {ph['cpu']:.2f} s")
    seconds = [r["seconds"] for r in runs]
    print(f"  jgc mode='directional': median {statistics.median(seconds):.2f} s over "
          f"{len(runs)} fresh processes (min {min(seconds):.2f} s, max {max(seconds):.2f} s)")
    print(f"  {[n for n in res['notes'] if n.startswith('directional')][0]}")


if __name__ == "__main__":
    main()
