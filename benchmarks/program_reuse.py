"""The cost of never reusing a stale program: keys that see every constant, at every depth.

A compiled program is reused only for the same program (jgc/_src/evaluators/programs.py): the
jaxpr's text, and the content of every constant held inside it, digested. Three workloads, each in a
fresh process, timed after the first check (which compiles):

  * unchanged: W1 (tanh MLP 20-16-3, 387 parameters, NumPy gradient) checked again: the key of
    an unchanged loss, compiling nothing;
  * rebuilt: the same loss built again as `jax.jit` over a closure holding X, with new arrays of
    the same shapes: the key sees the new constants (a new program, compiled once);
  * dataset: a loss closing over a 100 MB dataset inside a jitted helper, checked again: the
    digest of the nested constant on every check (BLAKE2b of its bytes).

Run: python benchmarks/program_reuse.py [--repeats 3] [--baseline PATH]

--baseline PATH runs the same children against another checkout of jgc (e.g. a git worktree of
an earlier commit) and prints both, as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, time, sys
import jax, jax.numpy as jnp, numpy as np
from jgc.examples import zoo
import jgc
from jgc._src.evaluators import programs

def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

out = {}
model = zoo.mlp((20, 16, 3), batch=8)
grad = zoo.mlp_grad(model)
check = lambda: jgc.check_grad(model.loss, model.params, *model.args, grad=grad, mode="full",
                               progress=False)
check()
before = programs.CACHE.compiles
out["unchanged"] = timed(check)
out["unchanged_compiles"] = programs.CACHE.compiles - before

rng = np.random.default_rng(0)
W = rng.normal(size=(4, 3))
def make(X):
    return jax.jit(lambda p: jnp.sum(jnp.tanh(X @ p) ** 2))
jgc.check_grad(make(rng.normal(size=(5, 4))), W, progress=False)
out["rebuilt"] = timed(lambda: jgc.check_grad(make(rng.normal(size=(5, 4))), W, progress=False))

data = rng.normal(size=(100_000, 125))  # 100 MB of float64
helper = jax.jit(lambda p: jnp.mean(jnp.tanh(data[:64] @ p) ** 2) + 0 * jnp.sum(data[-1]))
loss = lambda p: helper(p)
w = rng.normal(size=(125,)) * 0.01
jgc.check_grad(loss, w, mode="sample", samples=4, progress=False)
out["dataset"] = timed(lambda: jgc.check_grad(loss, w, mode="sample", samples=4,
                                              progress=False))
print(json.dumps(out))
"""


def run(repeats: int, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                              env=env, timeout=900)
        if done.returncode:
            raise SystemExit(done.stderr)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None,
                    help="another checkout of jgc to compare with (its root directory)")
    args = ap.parse_args()
    now = run(args.repeats, None)
    then = run(args.repeats, args.baseline) if args.baseline else None
    print(f"medians of {args.repeats} fresh processes, after the first check (compiled)")
    for key, what in (("unchanged", "W1 checked again, unchanged"),
                      ("rebuilt", "a jitted closure rebuilt with new arrays"),
                      ("dataset", "a loss holding a 100 MB dataset in a jitted helper")):
        line = f"  {what:52s} {now[key] * 1e3:8.1f} ms"
        if then:
            line += f"   baseline {then[key] * 1e3:8.1f} ms   ratio {now[key] / then[key]:.2f}"
        print(line)
    print(f"  programs compiled by the unchanged check: {now['unchanged_compiles']}"
          + (f" (baseline {then['unchanged_compiles']})" if then else ""))


if __name__ == "__main__":
    main()
