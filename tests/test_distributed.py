"""jax.distributed: 2 local processes x 2 forced CPU devices (gloo collectives, a free localhost
port) run the same checks (SPMD) and every process gets the same Reports as one process.

The checks (tests/distributed_worker.py) cover every evaluation path: dense full, sample,
directional and auto (whose timing decision is broadcast from process 0), float32, the
structured evaluator, a NumPy loss on the host, complex leaves, check_vjp, check_hvp and
check_jvp.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 300  # seconds for the whole run; it takes about 20 s on 2 CPU cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _differences(x, y, path=""):
    """Where two Report dicts differ: exactly, except floats within 1e-9 relative (reductions
    over differently sharded batches may round differently)."""
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            yield path, sorted(set(x) ^ set(y))
            return
        for k in x:
            yield from _differences(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            yield path, (len(x), len(y))
            return
        for i, (u, v) in enumerate(zip(x, y)):
            yield from _differences(u, v, f"{path}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        if not (x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y))):
            yield path, (x, y)
    elif x != y:
        yield path, (x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp / f"p{i}.json"), str(i), "2",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    single = subprocess.run([sys.executable, str(WORKER), str(tmp / "single.json"), "single"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a jax.distributed process did not finish in {TIMEOUT} s")
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
    assert single.returncode == 0, single.stdout + single.stderr
    return [json.loads((tmp / name).read_text()) for name in ("single.json", "p0.json",
                                                               "p1.json")]


def test_every_process_gets_the_one_process_report(runs):
    single, p0, p1 = runs
    assert p0.pop("_devices") == p1.pop("_devices") == [4, 2, 2]  # global, local, processes
    assert single.pop("_devices")[2] == 1
    assert list(_differences(p0, p1)) == []
    assert list(_differences(single, p0)) == []


def test_the_verdicts_are_the_expected_ones(runs):
    _, p0, _ = runs
    ok = {name for name, r in p0.items() if not name.startswith("_") and r["ok"]}
    assert ok == {"auto", "hvp"}
    assert p0["structured"]["verdict"] == "wrong_gradient"
    assert [leaf["path"] for leaf in p0["structured"]["leaves"]
            if leaf["status"] == "mismatch"] == ["['b1']"]
    assert p0["complex"]["leaves"][0]["pattern"] == "conjugate"  # ['W'], sorted first
