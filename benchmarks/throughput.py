"""Full-mode throughput: every entry of a 784-64-10 tanh MLP (batch 32, float64, n = 50,890).

Each tool runs in a fresh process (so compilation is included) and checks the same network:

  * jgc.check_grad(mode="full"), hand-written gradient (NumPy backprop);
  * torch.autograd.gradcheck(fast_mode=False), its mode that checks every entry;
  * the seeds' NumPy loop (CS231n's eval_numerical_gradient): two forward passes per entry.

It prints wall times, the ratios against jgc, and jgc's achieved FLOP/s against a float64 matrix
multiply measured in the same run.

Run: python benchmarks/throughput.py [--skip-slow]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

SETUP = """
import time, numpy as np
rng = np.random.default_rng(0)
D, H, C, M = 784, 64, 10, 32
P = {"W1": rng.normal(size=(D, H)) / np.sqrt(D), "b1": np.zeros(H),
     "W2": rng.normal(size=(H, C)) / np.sqrt(H), "b2": np.zeros(C)}
X = rng.normal(size=(M, D)); Y = np.eye(C)[rng.integers(0, C, size=M)]
N = sum(v.size for v in P.values())
# FLOPs of one forward pass: the two matrix products dominate; tanh, softmax and the mean are
# counted at one FLOP per element.
FLOPS = 2 * M * D * H + 2 * M * H * C + M * H + 4 * M * C

def np_loss(p, X, Y):
    h = np.tanh(X @ p["W1"] + p["b1"]); s = h @ p["W2"] + p["b2"]
    s = s - s.max(1, keepdims=True); logp = s - np.log(np.exp(s).sum(1, keepdims=True))
    return -(logp * Y).sum() / len(X)

def np_grad(p, X, Y):
    h = np.tanh(X @ p["W1"] + p["b1"]); s = h @ p["W2"] + p["b2"]
    e = np.exp(s - s.max(1, keepdims=True)); ds = (e / e.sum(1, keepdims=True) - Y) / len(X)
    dz = ds @ p["W2"].T * (1 - h ** 2)
    return {"W1": X.T @ dz, "b1": dz.sum(0), "W2": h.T @ ds, "b2": ds.sum(0)}
"""

JGC = SETUP + """
import jax, jax.numpy as jnp, jgc
def loss(p, X, Y):
    h = jnp.tanh(X @ p["W1"] + p["b1"]); logp = jax.nn.log_softmax(h @ p["W2"] + p["b2"])
    return -(logp * Y).sum() / X.shape[0]
t = time.perf_counter()
r = jgc.check_grad(loss, P, X, Y, grad=np_grad, mode="full", progress=False)
sec = time.perf_counter() - t
# A float64 matrix multiply, the machine's reference rate, in the same process.
with jax.enable_x64(True):
    a = jnp.asarray(rng.normal(size=(1024, 1024))); mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready(); t0 = time.perf_counter(); reps = 20
    for _ in range(reps): out = mm(a)
    out.block_until_ready(); mm_rate = reps * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    # The evaluations alone, compiled and warm: a second check of the same loss (no compile).
    t0 = time.perf_counter()
    r2 = jgc.check_grad(loss, P, X, Y, grad=np_grad, mode="full", progress=False)
    warm = time.perf_counter() - t0
print(json.dumps({"seconds": sec, "ok": r.ok, "evals": r.n_evaluations, "n": N,
                  "flops": FLOPS, "mm_rate": mm_rate, "warm": warm,
                  "warm_evals": r2.n_evaluations}))
"""

TORCH = SETUP + """
import torch
torch.set_default_dtype(torch.float64)
Xt, Yt = torch.tensor(X), torch.tensor(Y)
def f(W1, b1, W2, b2):
    h = torch.tanh(Xt @ W1 + b1); logp = torch.log_softmax(h @ W2 + b2, dim=1)
    return -(logp * Yt).sum() / Xt.shape[0]
inputs = tuple(torch.tensor(P[k], requires_grad=True) for k in ("W1", "b1", "W2", "b2"))
t = time.perf_counter()
ok = torch.autograd.gradcheck(f, inputs, fast_mode=False)
print(json.dumps({"seconds": time.perf_counter() - t, "ok": bool(ok)}))
"""

NUMPY_LOOP = SETUP + """
def eval_numerical_gradient(f, x, h=1e-5):
    # CS231n's loop: perturb one entry in place, two forward passes, restore.
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index; old = x[ix]
        x[ix] = old + h; fp = f(); x[ix] = old - h; fm = f(); x[ix] = old
        grad[ix] = (fp - fm) / (2 * h); it.iternext()
    return grad
t = time.perf_counter()
g = np_grad(P, X, Y)
num = {k: eval_numerical_gradient(lambda: np_loss(P, X, Y), P[k]) for k in P}
err = max(np.abs(num[k] - g[k]).max() / max(np.abs(num[k]).max(), 1e-12) for k in P)
print(json.dumps({"seconds": time.perf_counter() - t, "ok": bool(err < 1e-6)}))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", "import json\n" + textwrap.dedent(code)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"a benchmark process failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-slow", action="store_true", help="only run jgc")
    args = ap.parse_args()
    j = run(JGC)
    print(f"workload: tanh MLP 784-64-10, batch 32, float64, n = {j['n']:,} parameters, "
          "every entry checked; each tool in a fresh process, compilation included\n")
    print(f"  jgc check_grad(mode='full')      {j['seconds']:7.2f} s   ok={j['ok']}  "
          f"({j['evals']:,} loss evaluations)")
    if not args.skip_slow:
        t = run(TORCH)
        print(f"  torch.autograd.gradcheck (slow) {t['seconds']:7.2f} s   ok={t['ok']}   "
              f"jgc is {t['seconds'] / j['seconds']:.1f}x faster")
        n = run(NUMPY_LOOP)
        print(f"  NumPy loop (CS231n)             {n['seconds']:7.2f} s   ok={n['ok']}   "
              f"jgc is {n['seconds'] / j['seconds']:.1f}x faster")
    rate = j["warm_evals"] * j["flops"] / j["warm"]
    print(f"\n  jgc, warm (a second check, no compilation): {j['warm']:.2f} s, "
          f"{rate / 1e9:.1f} GFLOP/s on the loss evaluations")
    print(f"  float64 1024x1024 matrix multiply, same process: {j['mm_rate'] / 1e9:.1f} GFLOP/s")
    print(f"  jgc reaches {100 * rate / j['mm_rate']:.0f}% of the matrix-multiply rate")


if __name__ == "__main__":
    main()
