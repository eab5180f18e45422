"""Directional mode at scale: find one wrong entry among 4.2M parameters.

Workload: MLP 3072-1024-1024-10 (tanh), batch 32, float64, n = 4,206,602 parameters. The
hand-written gradient (NumPy backprop) is correct except for one entry of W2, planted. jgc must
name the leaf and the index; the run is timed end to end in a fresh process (imports excluded,
compilation included), and it prints the estimate of what a full check would cost.

Run: python benchmarks/directional.py
"""

from __future__ import annotations

import json
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

import jax, jax.numpy as jnp, jgc
def loss(p, X, Y):
    return 0.5 * jnp.sum((forward(p, X, jnp)[-1] - Y) ** 2) / X.shape[0]

t = time.perf_counter()
r = jgc.check_grad(loss, P, X, Y, grad=np_grad, mode="directional", progress=False)
sec = time.perf_counter() - t
bad = r.bad_leaves
print(json.dumps({"seconds": sec, "n": r.n_params, "evals": r.n_evaluations,
                  "leaves": [b.path for b in bad],
                  "index": list(bad[0].worst_index) if bad and bad[0].worst_index else None,
                  "notes": list(r.notes), "report": str(r)}))
"""


def main() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res["report"], "\n")
    found = res["leaves"] == ["['W1']"] and res["index"] == [517, 33]
    print(f"workload: MLP 3072-1024-1024-10, batch 32, float64, n = {res['n']:,}; one wrong "
          "entry planted at ['W1'][517, 33]")
    print(f"  jgc mode='directional': {res['seconds']:.1f} s end to end (compilation included), "
          f"{res['evals']:,} loss evaluations; found the leaf and the index: {found}")
    print(f"  {[n for n in res['notes'] if n.startswith('directional')][0]}")


if __name__ == "__main__":
    main()
