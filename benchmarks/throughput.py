"""Full-check throughput: jgc against torch.autograd.gradcheck, the NumPy loop and
jax.test_util.check_grads, on six workloads, all in one run.

Workloads (float64; the models are `jgc.examples.zoo`'s, rebuilt in torch from the same arrays):

  * W1: tanh MLP 20-16-3, batch 8 (387 parameters);
  * W2: tanh MLP 784-64-10, batch 32 (50,890);
  * CNN: the Flax MNIST CNN, conv 3x3 1->32, relu, avg-pool 2, conv 3x3 32->64, relu, avg-pool
    2, dense 3136->256, relu, dense 256->10, batch 4 (824,458); also with one wrong entry, and
    in float32 (x64=False) with and without one entry 5% off (--only "CNN float32");
  * MLP 4.2M: tanh MLP 3072-1024-1024-10, batch 32 (4,206,602);
  * LSTM: lax.scan over 8 steps, input 16, hidden 64, batch 4 (20,864);
  * attention: one self-attention layer, width 96, 16 tokens, batch 4 (27,840).

Every measurement runs in a fresh process (imports excluded, jgc's check module too, which
jgc imports on first use; compilation included) and is the median of --repeats runs. jgc runs
mode="full": every entry, both central-difference points, jax.grad as the reference, the
report. Its peak resident memory is read from /proc.

  * torch.autograd.gradcheck(fast_mode=False) also checks every entry. Where it would take
    longer than --torch-limit seconds it is not run: its time is *estimated* as n x 2 forward
    passes (what it spends per entry) at the forward time measured in the same process, and
    marked "~".
  * The NumPy loop (CS231n's eval_numerical_gradient, every entry) is run on the MLPs, whose
    NumPy forward pass is written here; it is estimated the same way where too slow.
  * torch fast mode and jax.test_util.check_grads test one random direction, not every entry:
    they are shown for their cost, not as equals.

Run: python benchmarks/throughput.py [--repeats 3] [--only W2,CNN] [--torch-limit 120]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

WORKLOADS = {
    "W1": "zoo.mlp((20, 16, 3), batch=8)",
    "W2": "zoo.mlp((784, 64, 10), batch=32)",
    "CNN": 'zoo.flax_cnn("mnist")',
    "MLP 4.2M": "zoo.mlp((3072, 1024, 1024, 10), batch=32)",
    "LSTM": "zoo.lstm_scan(d=16, h=64, T=8, m=4)",
    "attention": "zoo.attention(d=96, T=16, m=4)",
    "CNN float32": 'zoo.flax_cnn("mnist")',
}
JGC_ONLY = {"CNN float32"}  # no other tool checks every entry of it in reasonable time
# Rows of jgc alone, each against the row it varies (ratio in the notes): the float32 CNN
# (x64=False, float32 params and data), with one entry of the dense kernel 5% off; the scan LSTM
# with evaluator="dense" (the structured pass's speed-up, in fresh processes of the same run).
VARIANTS = {
    "CNN": [("CNN, one wrong entry", dict(wrong="x3"))],
    "CNN float32": [("CNN float32, one entry 5% off", dict(wrong="5%"))],
    "LSTM": [("LSTM, evaluator='dense'", dict(evaluator="dense"))],
}
OPTIONS = {"CNN float32": dict(x64=False)}

COMMON = """
import json, time, sys
import numpy as np
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
import jax
from jgc.examples import zoo
model = {model}
"""

JGC = COMMON + """
import jgc
check = jgc.check_grad  # jgc imports its check on first use: an import, excluded like torch's
grad = None
if "{wrong}" == "x3":  # one entry of jax.grad's gradient off by a factor 3: it must be named
    f64 = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float64)
                                 if np.issubdtype(np.asarray(v).dtype, np.floating) else v, t)
    with jax.enable_x64(True):
        g = jax.grad(model.loss)(f64(model.params), *f64(model.args))
    grad = jax.tree.map(np.array, g)
    grad["Dense_0"]["kernel"][1000, 17] *= 3
elif "{wrong}" == "5%":  # float32 jax.grad, its largest dense-kernel entry 5% off
    grad = jax.tree.map(np.array, jax.jit(jax.grad(model.loss))(model.params, *model.args))
    k = grad["Dense_0"]["kernel"]
    k[np.unravel_index(int(np.argmax(np.abs(k))), k.shape)] *= 1.05
t = time.perf_counter()
r = check(model.loss, model.params, *model.args, grad=grad, mode="full", progress=False,
          x64={x64}, evaluator="{evaluator}")
sec = time.perf_counter() - t
bad = [(b.path, list(b.worst_index)) for b in r.bad_leaves]
note = next((n for n in r.notes if "structured evaluation" in n or "dense evaluation" in n),
            "dense evaluation (the whole loss per perturbation)")
print(json.dumps({{"seconds": sec, "ok": r.ok, "n": r.n_params, "evals": r.n_evaluations,
                  "bad": bad, "note": note, "rss": hwm(),
                  "verdicts": [(x.path, x.status.name) for x in r.leaves]}}))
"""

TORCH = COMMON + """
import torch
from torch.autograd.gradcheck import GradcheckError
torch.set_default_dtype(torch.float64)
T = lambda a: torch.tensor(np.asarray(a, np.float64))
name, p, args = model.name, model.params, model.args
if name.startswith("mlp"):
    X, Y = map(T, args); keys = sorted(p, key=lambda k: (int(k[1:]), k[0] == "b"))
    inputs = [T(p[k]).requires_grad_() for k in keys]
    def f(*w):
        h = X
        for i in range(len(w) // 2):
            h = h @ w[2 * i] + w[2 * i + 1]
            h = torch.tanh(h) if i < len(w) // 2 - 1 else h
        return -(Y * torch.log_softmax(h, 1)).sum() / X.shape[0]
elif name.startswith("flax_cnn"):
    X, y = T(args[0]).permute(0, 3, 1, 2), torch.tensor(np.asarray(args[1]))
    inputs = [T(p[a][b]).requires_grad_() for a in ("Conv_0", "Conv_1", "Dense_0", "Dense_1")
              for b in ("kernel", "bias")]
    def f(k0, b0, k1, b1, d0, c0, d1, c1):
        h = torch.nn.functional.avg_pool2d(torch.relu(torch.nn.functional.conv2d(
            X, k0.permute(3, 2, 0, 1), b0, padding=1)), 2)
        h = torch.nn.functional.avg_pool2d(torch.relu(torch.nn.functional.conv2d(
            h, k1.permute(3, 2, 0, 1), b1, padding=1)), 2)
        h = torch.relu(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ d0 + c0) @ d1 + c1
        return -torch.log_softmax(h, 1)[torch.arange(len(y)), y].mean()
elif name.startswith("lstm"):
    X, Y = map(T, args); inputs = [T(p[k]).requires_grad_() for k in ("Wx", "Wh", "b", "Wo")]
    def f(Wx, Wh, b, Wo):
        hh = c = torch.zeros(X.shape[1], Wh.shape[0])
        for x in X:
            i, fg, o, g = torch.split(x @ Wx + hh @ Wh + b, Wh.shape[0], -1)
            c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
            hh = torch.sigmoid(o) * torch.tanh(c)
        return ((hh @ Wo - Y) ** 2).mean()
else:
    X, Y = map(T, args); inputs = [T(p[k]).requires_grad_() for k in ("Wq", "Wk", "Wv", "Wo")]
    def f(Wq, Wk, Wv, Wo):
        q, k, v = X @ Wq, X @ Wk, X @ Wv
        a = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(X.shape[-1]), -1)
        return ((((a @ v).mean(1)) @ Wo - Y) ** 2).mean()
n = sum(x.numel() for x in inputs)
with torch.no_grad():
    f(*inputs); t = time.perf_counter(); reps = 0
    while time.perf_counter() - t < 0.5:
        f(*inputs); reps += 1
    forward = (time.perf_counter() - t) / reps
fast = {fast}
if fast or 2 * n * forward < {limit}:
    t = time.perf_counter()
    try:
        ok = torch.autograd.gradcheck(f, tuple(inputs), fast_mode=fast)
    except GradcheckError:  # a false alarm on a correct gradient
        ok = False
    print(json.dumps({{"seconds": time.perf_counter() - t, "ok": bool(ok), "estimated": False}}))
else:
    print(json.dumps({{"seconds": 2 * n * forward, "ok": None, "estimated": True}}))
"""

NUMPY_LOOP = COMMON + """
p = {{k: np.array(v) for k, v in model.params.items()}}; X, Y = model.args
layers = len(p) // 2
def np_loss():
    h = X
    for i in range(layers):
        h = h @ p[f"W{{i}}"] + p[f"b{{i}}"]
        h = np.tanh(h) if i < layers - 1 else h
    s = h - h.max(1, keepdims=True); logp = s - np.log(np.exp(s).sum(1, keepdims=True))
    return -(logp * Y).sum() / len(X)
n = sum(v.size for v in p.values())
t = time.perf_counter(); reps = 0
while time.perf_counter() - t < 0.5:
    np_loss(); reps += 1
forward = (time.perf_counter() - t) / reps
if 2 * n * forward > {limit}:
    print(json.dumps({{"seconds": 2 * n * forward, "ok": None, "estimated": True}})); sys.exit()
grad = zoo.mlp_grad(model)(p, X, Y)
def eval_numerical_gradient(f, x, h=1e-5):
    # CS231n's loop: perturb one entry in place, two forward passes, restore.
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index; old = x[ix]
        x[ix] = old + h; fp = f(); x[ix] = old - h; fm = f(); x[ix] = old
        g[ix] = (fp - fm) / (2 * h); it.iternext()
    return g
t = time.perf_counter()
num = {{k: eval_numerical_gradient(np_loss, p[k]) for k in p}}
err = max(np.abs(num[k] - grad[k]).max() / max(np.abs(num[k]).max(), 1e-12) for k in p)
print(json.dumps({{"seconds": time.perf_counter() - t, "ok": bool(err < 1e-6),
                  "estimated": False}}))
"""

CHECK_GRADS = COMMON + """
from jax.test_util import check_grads
with jax.enable_x64(True):
    params = jax.tree.map(lambda v: np.asarray(v, np.float64), model.params)
    args = tuple(np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)
                 else a for a in model.args)
    t = time.perf_counter()
    try:
        check_grads(lambda q: model.loss(q, *args), (params,), order=1, modes=("rev",))
        ok = True
    except AssertionError:  # its verdict on a correct gradient: a false alarm
        ok = False
    print(json.dumps({{"seconds": time.perf_counter() - t, "ok": ok, "estimated": False}}))
"""


def run(code: str, **fmt) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code.format(**fmt))],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"a benchmark process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(repeats: int, code: str, **fmt) -> dict:
    """The median time of `repeats` fresh processes (one, where the time is an estimate)."""
    runs = [run(code, **fmt)]
    if runs[0].get("estimated"):
        return runs[0]
    runs += [run(code, **fmt) for _ in range(repeats - 1)]
    out = dict(runs[0])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    return out


def _time(r: dict | None) -> str:
    """The time; "~" where estimated; "(false alarm)" where a tool failed a correct gradient."""
    if r is None:
        return "—"
    s = r["seconds"]
    text = f"{s:.2f} s" if s < 100 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
    text = ("~" + text) if r.get("estimated") else text
    return text + (" (false alarm)" if r.get("ok") is False else "")


def _ratio(other: dict | None, jgc: dict) -> str:
    if other is None:
        return "—"
    return f"{'~' if other.get('estimated') else ''}{other['seconds'] / jgc['seconds']:.1f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated workloads, e.g. W2,CNN")
    ap.add_argument("--torch-limit", type=float, default=120.0,
                    help="estimate torch's slow mode and the NumPy loop beyond this (seconds)")
    args = ap.parse_args()
    names = [w.strip() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    rows, notes = [], []
    for name in names:
        model = WORKLOADS[name]
        # The 4.2M check takes minutes: one run, said so in the table.
        reps = 1 if name == "MLP 4.2M" else args.repeats

        def med(code, reps=reps, model=model, **kw):
            return median_of(reps, code, model=model, **kw)

        opts = {"wrong": "", "x64": True, "evaluator": "auto", **OPTIONS.get(name, {})}
        j = med(JGC, **opts)
        if name in JGC_ONLY:
            slow = fast = loop = cg = None
        else:
            slow = med(TORCH, fast=False, limit=args.torch_limit)
            fast = med(TORCH, fast=True, limit=args.torch_limit)
            loop = med(NUMPY_LOOP, limit=args.torch_limit) if name in ("W1", "W2") else None
            cg = med(CHECK_GRADS)
        rows.append((name, j, slow, loop, fast, cg, reps))
        notes.append(f"{name}: {j['note']}")
        for label, change in VARIANTS.get(name, []):
            w = med(JGC, **{**opts, **change})
            if change.get("wrong"):  # its mismatch is the right answer, not a false alarm
                rows.append((label, dict(w, ok=None), None, None, None, None, reps))
                notes.append(f"{label}: named {w['bad']}")
            else:
                rows.append((label, w, None, None, None, None, reps))
                notes.append(f"{label}: {w['seconds'] / j['seconds']:.1f}x the time of {name}; "
                             f"same verdicts: {w['verdicts'] == j['verdicts']}; {w['note']}")
        print(f"  measured {name}: jgc {_time(j)} (ok={j['ok']}, peak RSS {j['rss']:.0f} MiB)",
              flush=True)
    print("\nEvery entry checked (float64 unless the row says float32; fresh processes, "
          f"compilation included; medians of {args.repeats}, ~ = estimated from the measured "
          "forward time):\n")
    head = ("| workload | n | jgc full | peak RSS | torch slow | vs torch slow | NumPy loop "
            "| vs NumPy loop | torch fast (1 direction) | check_grads (1 direction) |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, j, slow, loop, fast, cg, reps in rows:
        runs = "" if reps > 1 else " (1 run)"
        print(f"| {name} | {j['n']:,} | {_time(j)}{runs} | {j['rss']:.0f} MiB | {_time(slow)} | "
              f"{_ratio(slow, j)} | {_time(loop)} | {_ratio(loop, j)} | {_time(fast)} | "
              f"{_time(cg)} |")
    print("\nHow jgc evaluated each workload (its report's note):")
    for n in notes:
        print(f"  {n}")


if __name__ == "__main__":
    main()
