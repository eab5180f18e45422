"""One process of a jax.distributed check (run by tests/test_distributed.py), or the
single-process reference.

    python tests/distributed_worker.py OUT.json single
    python tests/distributed_worker.py OUT.json PROCESS_ID N_PROCESSES PORT

Each process forces DEVICES CPU devices and runs the same checks (SPMD), then writes every
Report's dict (less its timing) to OUT.json.
"""

import json
import os
import sys

DEVICES = 2


def main(out_path: str, rest: list[str]) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    import jax

    if rest != ["single"]:
        pid, n, port = (int(a) for a in rest)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n,
                                   process_id=pid, initialization_timeout=60)
    results = {name: stable(report.to_dict()) for name, report in checks()}
    results["_devices"] = [jax.device_count(), jax.local_device_count(), jax.process_count()]
    with open(out_path, "w") as f:
        json.dump(results, f)
    if rest != ["single"]:
        jax.distributed.shutdown()


def checks():
    """(name, report) for every path a check can take: dense (full, sample, directional, auto),
    the structured evaluator, a NumPy loss on the host, complex leaves, check_vjp, check_hvp and
    check_jvp (the vjp's backward misses tanh's derivative: a planted bug)."""
    import jax.numpy as jnp
    import numpy as np

    import jgc
    from jgc.examples import complex_nets, mlp, zoo

    ex = mlp("tanh")
    bug = ex.bugs["b1_4_over_m"].grad
    yield "dense full", jgc.check_grad(ex.loss, ex.params, *ex.args, grad=bug, mode="full")
    yield "dense sample", jgc.check_grad(ex.loss, ex.params, *ex.args, grad=bug, mode="sample",
                                         samples=4)
    yield "directional", jgc.check_grad(ex.loss, ex.params, *ex.args, grad=bug,
                                        mode="directional")
    yield "auto", jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    yield "float32", jgc.check_grad(ex.loss, ex.params, *ex.args, grad=bug, x64=False)
    big = zoo.mlp((96, 160, 64, 10), batch=16, seed=0)  # 26,474 parameters: structured
    wrong = zoo.mlp_grad(big)(big.params, *big.args)
    wrong["b1"] = wrong["b1"] * 2
    yield "structured", jgc.check_grad(big.loss, big.params, *big.args, grad=wrong, mode="full")
    npex = mlp("sigmoid", xp=np)
    yield "host", jgc.check_grad(npex.loss, npex.params, *npex.args,
                                 grad=npex.bugs["b2_sign"].grad)
    cx = complex_nets.modrelu(xp=jnp)
    yield "complex", jgc.check_grad(cx.loss, cx.params, *cx.args, grad=cx.bugs["conjugate"].grad)
    x = np.linspace(0.1, 1.0, 6).reshape(2, 3)
    w = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    yield "vjp", jgc.check_vjp(lambda x, w: jnp.tanh(x @ w),
                               lambda c, x, w: (c @ w.T, x.T @ c), (x, w))
    yield "hvp", jgc.check_hvp(lambda p: jnp.sum(p["w"] ** 3), {"w": w},
                               hvp=lambda p, v: {"w": 6 * p["w"] * v["w"]})
    yield "jvp", jgc.check_jvp(jnp.sin, lambda p, t: (jnp.sin(p[0]), 2 * jnp.cos(p[0]) * t[0]),
                               (x,))


def stable(d: dict) -> dict:
    d = dict(d)
    d.pop("seconds", None)
    return d



if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
