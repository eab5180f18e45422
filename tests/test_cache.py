"""The opt-in persistent compilation cache: off unless asked, a second process reuses it, a
session's cache is undone after it, and a process never reads another's entry half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jgc
from jgc._src.evaluators import diskcache as jgc_cache

# A tiny check in a fresh process, counting JAX's persistent-cache hits and misses.
CHILD = """
import json, jax
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
import numpy as np, jax.numpy as jnp, jgc
rng = np.random.default_rng(0)
p = {"W": rng.normal(size=(4, 3)), "b": np.zeros(3)}
X = rng.normal(size=(5, 4))
r = jgc.check_grad(lambda p, X: jnp.sum(jnp.tanh(X @ p["W"] + p["b"]) ** 2), p, X)
print(json.dumps({"ok": r.ok, "dir": jax.config.jax_compilation_cache_dir,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/compile_requests_use_cache")
                            - events.count("/jax/compilation_cache/cache_hits")}))
"""


def _child(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _printed_without_the_variable(code: str) -> list[str]:
    """What `code` prints, split into words, in a fresh process without JGC_COMPILATION_CACHE."""
    env = {k: v for k, v in os.environ.items() if k != "JGC_COMPILATION_CACHE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_importing_jgc_leaves_the_cache_alone():
    assert _printed_without_the_variable(
        "import jax, jgc; print(jax.config.jax_compilation_cache_dir, "
        "jax.config.jax_persistent_cache_min_compile_time_secs)") == ["None", "1.0"]


def test_importing_jgc_imports_no_jax_until_a_check_is_used():
    """pytest imports jgc's plugin, so jgc, at start-up wherever jgc is installed."""
    assert _printed_without_the_variable(
        "import sys, jgc; print('jax' in sys.modules); from jgc import check_grad; "
        "print('jax' in sys.modules, check_grad is jgc.check_grad, 'check_grad' in dir(jgc))"
    ) == ["False", "True", "True", "True"]


def test_environment_variable_caches_small_programs_for_the_next_process(tmp_path):
    cache = tmp_path / "xla"
    first = _child({"JGC_COMPILATION_CACHE": str(cache)})
    assert first["ok"] and first["dir"] == str(cache) and first["misses"] >= 2
    assert any(cache.iterdir())  # small programs were written despite JAX's 1 s default
    second = _child({"JGC_COMPILATION_CACHE": str(cache)})
    assert second["ok"] and second["hits"] >= 2 and second["misses"] == 0


def test_enable_compilation_cache_sets_and_returns_the_directory(tmp_path, monkeypatch):
    saved = {k: jax.config.values[k] for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        path = jgc.enable_compilation_cache()
        assert path == tmp_path / "jgc" / "xla" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    finally:  # this test asked for the change; the rest of the suite did not
        for k, v in saved.items():
            jax.config.update(k, v)


def test_a_cache_path_that_is_a_file_is_refused_by_name(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(jgc.InputError, match="not_a_dir.*cannot be created.*writable"):
        jgc.enable_compilation_cache(blocker / "xla")
    assert jax.config.jax_compilation_cache_dir != str(blocker / "xla")  # nothing changed
    env = {**os.environ, "JGC_COMPILATION_CACHE": str(blocker)}
    # Importing warns and runs without the cache; the command line refuses, with one line.
    out = subprocess.run([sys.executable, "-c", "import jax, jgc; "
                          "print(jax.config.jax_compilation_cache_dir)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["None"], out.stderr
    assert "RuntimeWarning: JGC_COMPILATION_CACHE=" in out.stderr
    assert "jgc runs without the compilation cache" in out.stderr
    out = subprocess.run([sys.executable, "-m", "jgc", "demo"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    line = [x for x in out.stderr.splitlines() if x.startswith("jgc: error:")]
    assert line and "JGC_COMPILATION_CACHE=" in line[0] and "Traceback" not in out.stderr


@pytest.mark.parametrize("value", ["false", "OFF", "no", "0", ""])
def test_off_values_of_the_environment_variable_leave_the_cache_off(value, tmp_path):
    out = subprocess.run([sys.executable, "-c", "import jax, jgc; "
                          "print(jax.config.jax_compilation_cache_dir)"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "JGC_COMPILATION_CACHE": value}, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["None"], out.stderr
    assert not any(tmp_path.iterdir())  # no directory named after the value


def test_an_empty_path_is_refused():
    with pytest.raises(jgc.InputError, match=r"path=''\): an empty path would cache into"):
        jgc.enable_compilation_cache("")


def test_a_second_directory_takes_over(tmp_path):
    """JAX opens its cache at the first compilation; asked for another directory later, every
    new program must go there, not to the first."""
    script = f"""
import jax, jax.numpy as jnp, pathlib, jgc
a, b = pathlib.Path({str(tmp_path / "a")!r}), pathlib.Path({str(tmp_path / "b")!r})
jgc.enable_compilation_cache(a)
jax.jit(lambda x: x * 2.0)(jnp.ones(3))
n_a = len(list(a.iterdir()))
assert jgc.enable_compilation_cache(b) == b
jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(3))
print(n_a, len(list(a.iterdir())), len(list(b.iterdir())))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    n_a, n_a_after, n_b = map(int, out.stdout.split())
    assert n_a >= 1 and n_a_after == n_a and n_b >= 1


def test_the_session_cache_restores_jax_settings(tmp_path):
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: jax.config.values[name] for name in names}
    with jgc_cache.compilation_cache(tmp_path / "xla") as directory:
        assert jax.config.jax_compilation_cache_dir == str(directory) == str(tmp_path / "xla")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        jax.jit(lambda x: x * 3.25 + 1)(np.ones(7)).block_until_ready()
    filled = sorted(directory.iterdir())
    assert filled  # the block's programs went to its directory
    assert {name: jax.config.values[name] for name in names} == before
    jax.jit(lambda x: x * 4.75 - 1)(np.ones(9)).block_until_ready()
    assert sorted(directory.iterdir()) == filled  # and JAX let go of it afterwards


READER = r"""
import sys, time
from jax._src.lru_cache import LRUCache
cache = LRUCache(sys.argv[1], max_size=-1)
n, size = int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
partial = 0
for i in range(n):
    deadline = time.monotonic() + 60
    while (value := cache.get(f"k{i}")) is None or len(value) != size:
        partial += value is not None
        if time.monotonic() > deadline:
            sys.exit("timed out")
print(partial)
"""


def test_another_process_never_reads_a_partial_entry(tmp_path):
    """A reader polling JAX's file cache while this process writes 60 entries of 2 MB. Without
    atomic_entries it read about 1900 truncated ones on a quiet two-core machine."""
    from jax._src.lru_cache import LRUCache

    put, n, size = LRUCache.put, 60, 2 << 20
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path), str(n), str(size)],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"
    with jgc_cache.atomic_entries():
        assert LRUCache.put is not put
        writer = LRUCache(str(tmp_path), max_size=-1)
        for i in range(n):
            writer.put(f"k{i}", bytes([i]) * size)
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0 and out.strip() == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"k{i}-cache" for i in range(n))
    assert LRUCache.put is put  # JAX's own again
