"""Scale: several devices, directional mode, auto mode, memory budget, progress, recompiles."""

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.compat import enable_x64
from jgc._src.evaluators import budget, dense, programs, progress
from jgc._src.stages import plan
from jgc.examples import mlp

SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, jgc
    from jgc._src.evaluators import dense
    from jgc.examples import mlp
    if sys.argv[1] == "per_leaf":
        dense.PER_LEAF_MIN = 0  # force one batched function per leaf
    ex = mlp("tanh", width=6)
    out = {"devices": len(jax.devices())}
    for name, grad in (("ok", ex.grad), ("bug", ex.bugs["b1_4_over_m"].grad)):
        for mode in ("full", "directional"):
            r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=grad, mode=mode)
            out[name + mode] = [r.ok, [(l.path, l.status, l.numerical, l.checked,
                                        l.max_rel_error) for l in r.leaves]]
    g = jgc.numerical_grad(ex.loss, ex.params, *ex.args)
    out["num"] = {k: np.asarray(v).tolist() for k, v in g.items()}
    print(json.dumps(out))
""")


def _run(devices: int, path: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, "-c", SHARD_SCRIPT, path], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", ["flat", "per_leaf"])
def test_four_devices_give_identical_results(path):
    one, four = _run(1, path), _run(4, path)
    assert one.pop("devices") == 1 and four.pop("devices") == 4
    assert one == four  # bit for bit: each device runs the one-device program on its share
    assert one["okfull"][0] and not one["bugfull"][0]


def _one_wrong_entry(ex, where):
    def grad(p, *args):
        g = dict(ex.grad(p, *args))
        leaf, idx = where
        a = np.array(g[leaf], copy=True)
        a[idx] += 0.05
        g[leaf] = a
        return g
    return grad


@pytest.mark.parametrize("leaf,idx", [("W1", (3, 2)), ("b2", (1,)), ("W2", (0, 0))])
def test_directional_finds_the_wrong_entry(leaf, idx):
    ex = mlp("tanh", width=12)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=_one_wrong_entry(ex, (leaf, idx)),
                       mode="directional")
    assert r.mode == "directional"
    assert [x.path for x in r.bad_leaves] == [f"['{leaf}']"]
    bad = r.leaf(f"['{leaf}']")
    assert bad.worst_index == idx and bad.n_mismatch == 1
    assert "located by group testing" in r.diagnosis
    full = 2 * r.n_params
    assert r.n_evaluations < full  # cheaper than checking every entry
    assert any("random directions per leaf" in n for n in r.notes)


def test_directional_passes_correct_and_names_scale_bug():
    ex = mlp("tanh", width=12)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, mode="directional")
    assert r.ok and all(x.directions == 2 for x in r.leaves)
    assert "along all 8 random directions" in r.diagnosis
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["b1_4_over_m"].grad,
                       mode="directional")
    assert [x.path for x in r.bad_leaves] == ["['b1']"]


def test_directions_are_seeded_by_path():
    from jgc._src.stages.directional import direction
    a = direction(0, "['W1']", 0, 10)
    assert np.array_equal(a, direction(0, "['W1']", 0, 10))
    assert not np.array_equal(a, direction(0, "['W2']", 0, 10))


def test_auto_switches_to_directional_when_full_is_costly(monkeypatch):
    """With no time to spare, a model whose full check costs more than directional mode's gets
    directional mode: decided from the first stencil's measured throughput."""
    ex = mlp("tanh", width=400)  # n = 161,203: a full check costs more than directions
    monkeypatch.setattr(plan, "AUTO_SECONDS", 0.0)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.bugs["W1_transposed"].grad)
    assert r.mode == "directional" and not r.ok
    assert any(n.startswith("auto: a full check would take about") and "ms each on average, after "
               "compilation" in n for n in r.notes)
    monkeypatch.setattr(plan, "AUTO_SECONDS", 1e9)
    small = mlp("tanh")
    assert jgc.check_grad(small.loss, small.params, *small.args, grad=small.grad).mode == "full"


def test_auto_picks_full_for_a_cheap_check_every_time():
    """A 2,080-parameter network whose full check takes a fraction of a second: auto once
    predicted minutes from one padded batch timed as one evaluation, and chose differently
    from run to run."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(32, 64))
    loss = lambda p, X: jnp.mean(jnp.tanh(X @ p["W"] + p["b"][None, :]) ** 2)
    p = {"W": rng.normal(size=(64, 32)) / 8, "b": rng.normal(size=32) / 4}
    modes = {jgc.check_grad(loss, p, X).mode for _ in range(3)}
    assert modes == {"full"}


def test_default_memory_budget_is_sane():
    b = budget.default_memory_budget()
    assert 256 * 2**20 <= b <= 2**30


@pytest.mark.parametrize("plain", [False, True], ids=["tqdm", "plain"])
def test_progress_bar_shows_only_for_long_runs(monkeypatch, plain):
    """tqdm (the `progress` extra, in the test extra too) or, without it, one plain line; either
    way nothing for a batch shorter than show_after."""
    if not plain:
        pytest.importorskip("tqdm")
    stream = io.StringIO()
    bar = progress.Progress(stream=stream, show_after=0.0, plain=plain).start(100)
    for _ in range(10):
        bar.update(10)
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "/100" in text
    assert ("100/100 evaluations" in text and text.endswith("\n")) if plain else "eval" in text
    quiet = io.StringIO()
    bar = progress.Progress(stream=quiet, show_after=3600.0, plain=plain).start(100)
    bar.update(50)
    bar.update(50)
    bar.close()
    assert quiet.getvalue() == ""
    assert progress.enabled(False) is False and progress.enabled(True) is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, no notebook
    assert progress.enabled(None) is False


def test_a_check_drives_the_bar(monkeypatch):
    """progress=True: the check's batches advance a bar to their total."""
    stream = io.StringIO()
    monkeypatch.setattr(progress, "SHOW_AFTER", 0.0)
    monkeypatch.setattr(progress.sys, "stderr", stream)
    ex = mlp("tanh")
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, mode="full", progress=True)
    assert r.ok
    assert re.search(r"jgc: .*\d+/\d+", stream.getvalue())


def test_no_n_by_n_array(monkeypatch):
    """No compiled program of a check holds an (n x n) array: XLA's own accounting of each
    program's temporary buffers stays far below n*n entries (the batched perturbations are
    (chunk x n), chunk <= 512 < n). The positive control: the batches are seen, and they do
    hold (chunk x n) values."""
    from jgc._src.evaluators import programs
    ex = mlp("tanh", width=40)  # n = 1,763
    n = sum(v.size for v in ex.params.values())
    seen = []
    orig = programs.compiled

    def spy(*args, **kwargs):
        program = orig(*args, **kwargs)
        seen.append((args[0], program.memory_analysis().temp_size_in_bytes))
        return program

    monkeypatch.setattr(programs, "compiled", spy)
    monkeypatch.setattr(programs, "CACHE", programs._Cache(programs.CACHE_SIZE))
    jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad)
    batches = [size for kind, size in seen if kind == "losses_at"]
    assert batches and max(batches) >= 64 * n * 8  # (chunk x n) float64 values
    assert max(size for _, size in seen) < n * n * 8 / 2


def test_second_check_of_larger_model_compiles_nothing():
    ex = mlp("tanh", width=150)  # n = 23,103: one batched function per leaf
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, mode="directional")
    assert r.ok
    other = jax.tree_util.tree_map(lambda v: v * 0.9, ex.params)
    from test_check import _count_compiles
    with jax.log_compiles(), _count_compiles() as count:
        jgc.check_grad(ex.loss, other, *ex.args, grad=ex.grad, mode="directional")
    assert count() == 0
    # The positive control: a changed loss compiles, and the same counter sees it.
    changed = lambda p, X, Y: ex.loss(p, X, Y) * 2.0
    with jax.log_compiles(), _count_compiles() as count:
        jgc.check_grad(changed, other, *ex.args, mode="directional")
    assert count() > 0


@pytest.mark.parametrize("x64", [True, False])  # the structured pass; the dense per-leaf path
def test_leaf_programs_compile_together_on_worker_threads(monkeypatch, x64):
    """The per-leaf programs of a stencil are compiled on worker threads before the loop
    evaluates them, for exactly the chunks the loop passes: the loop compiles none of them
    again, the check compiles as many programs as it would one after the other, and the report
    is the same."""
    ex = mlp("tanh", width=150)  # n = 23,103: a program per leaf
    ex_bad = ex.bugs["b2_sign"].grad

    def run(precompile: bool):
        monkeypatch.setattr(programs, "CACHE", programs._Cache(programs.CACHE_SIZE))
        if not precompile:
            monkeypatch.setattr(dense.DenseEvaluator, "_precompile", lambda *a: None)
        threads = []
        real = programs.compiled

        def spy(name, *a, **kw):
            before = programs.CACHE.compiles
            out = real(name, *a, **kw)
            if programs.CACHE.compiles > before:
                threads.append((name, threading.current_thread() is threading.main_thread()))
            return out

        monkeypatch.setattr(programs, "compiled", spy)
        r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex_bad, mode="full", x64=x64)
        monkeypatch.undo()
        return r, threads

    together, threads = run(True)
    alone, threads_alone = run(False)
    on_workers = [name for name, main in threads if name == "structured" and not main]
    assert len(on_workers) == len(ex.params)  # every leaf's program, off the main thread
    assert sorted(threads) != sorted(threads_alone)
    assert sorted(name for name, _ in threads) == sorted(name for name, _ in threads_alone)
    assert together.bad_leaves and [b.path for b in together.bad_leaves] == ["['b2']"]
    for a, b in zip(together.leaves, alone.leaves):
        assert (a.path, a.status, a.n_checked, a.pattern) == (b.path, b.status, b.n_checked,
                                                               b.pattern)
        assert a.max_rel_error == b.max_rel_error  # the same programs: the same numbers


def _constant_heavy_mlp(extra_leaf=None):
    """A float32 tanh MLP whose loss carries a large constant (a likelihood's normalising
    constant): its rounding is that of 300, and each of W's 20,000 entries changes the loss by
    little more than that, so one by one they resolve a leaf-wide factor of only ~4%."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {"W": 0.05 * jax.random.normal(k[0], (200, 100), jnp.float32),
         "V": jax.random.normal(k[1], (100, 1), jnp.float32) / 10}
    if extra_leaf is not None:
        p["c"] = jnp.ones(3, extra_leaf)
    X = jax.random.normal(k[2], (16, 200), jnp.float32)
    Y = jax.random.normal(k[3], (16, 1), jnp.float32)

    def loss(p, X, Y):
        extra = jnp.sum(p["c"].astype(jnp.float32)) / 8 if "c" in p else 0.0
        return 300.0 + jnp.mean((jnp.tanh(X @ p["W"]) @ p["V"] - Y) ** 2) + extra

    def grad(factor):
        def g(p, X, Y):
            out = jax.grad(loss)(p, X, Y)
            return {**out, "W": out["W"] * factor}
        return g
    return loss, p, (X, Y), grad


@pytest.mark.parametrize("extra_leaf", [None, "float64"])
def test_full_checks_test_coarse_leaves_along_directions_too(extra_leaf):
    """A leaf whose entries one by one resolve no better than 1% is also tested along random
    directions, which sum the signal of all its entries: W x1.02 was missed (W's stated
    resolution 4.2%) and is now named. With leaves in two dtypes (float32 and float64, x64 on
    globally) each leaf's directions run in a program of its own dtype."""
    with enable_x64(extra_leaf is not None):
        loss, p, args, grad = _constant_heavy_mlp(extra_leaf and jnp.float64)
        r = jgc.check_grad(loss, p, *args, grad=grad(1.0), mode="full", x64=False)
        assert r.ok, r
        assert r.leaf("['W']").directions == 2 and r.leaf("['W']").resolution < 0.03
        assert r.leaf("['V']").directions == 0  # its entries resolve it finer than 1%
        assert any(n.startswith("full: ['W']") and "also tested along 2 random directions" in n
                   for n in r.notes)
        if extra_leaf is None:
            assert "along all 2 random directions (1 leaf)" in r.diagnosis
        assert jgc.check_grad(loss, p, *args, mode="full", x64=False).ok  # jax.grad itself
        r = jgc.check_grad(loss, p, *args, grad=grad(1.02), mode="full", x64=False)
        assert r.verdict == "wrong_gradient" and [x.path for x in r.bad_leaves] == ["['W']"]
        assert r.leaf("['W']").factor == pytest.approx(1.02, abs=0.01)
        assert "['W'] is 1.02× too large" in r.diagnosis


def test_full_checks_whose_leaves_resolve_test_no_direction():
    """Directions are only for coarse leaves: a float64 check resolves every leaf entry by
    entry and compiles nothing more."""
    ex = mlp("tanh", width=12)
    r = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, mode="full")
    assert r.ok and all(x.directions == 0 for x in r.leaves)
    assert not any(n.startswith("full:") for n in r.notes)
