"""Peak memory of a full check of 1M parameters.

Workload: four leaves of 262,144 float64 parameters (n = 1,048,576) and a loss that touches
every parameter (a sum of log-cosh terms plus a coupling between leaves), mode="full", default
memory budget. A full check is 2M evaluations; its memory is steady-state from the first chunk
on (every chunk has the same size), so the process runs the check for --seconds and reports the
peak resident set size (VmHWM) reached, before and during the check.

Run: python benchmarks/memory.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CODE = """
import os, sys, threading, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
import numpy as np, jax, jax.numpy as jnp, jgc
from jgc._src.evaluators import budget
rng = np.random.default_rng(0)
P = {f"w{i}": rng.normal(size=(512, 512)) for i in range(4)}
def loss(p):
    terms = [jnp.sum(jnp.log(jnp.cosh(p[k] - 0.1))) for k in sorted(p)]
    return sum(terms) + jnp.sum(p["w0"] * p["w1"]) * 1e-3
before = hwm()
budget = budget.default_memory_budget() / 2**20
print(f"n = {sum(v.size for v in P.values()):,}; budget {budget:.0f} MiB; "
      f"peak RSS before the check {before:.0f} MiB", flush=True)
def watch(limit):
    time.sleep(limit)
    print(f"peak RSS after {limit:.0f} s of the full check: {hwm():.0f} MiB", flush=True)
    os._exit(0)
threading.Thread(target=watch, args=(float(sys.argv[1]),), daemon=True).start()
jgc.check_grad(loss, P, grad=lambda p: {k: np.tanh(v - 0.1) for k, v in p.items()},
               mode="full", progress=False)
print(f"finished; peak RSS {hwm():.0f} MiB")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    out = subprocess.run([sys.executable, "-c", CODE, str(args.seconds)], capture_output=True,
                         text=True)
    print(out.stdout.strip() or out.stderr)


if __name__ == "__main__":
    main()
