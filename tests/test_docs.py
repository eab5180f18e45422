"""Every code block of README.md and docs/ runs, so that the documentation cannot rot.

Each file is one test: its ```python blocks run in order in one namespace, as a reader would
paste them into one session, under JAX's default promotion rules (a reader's; the suite sets
strict ones). After each block, the `test_*` functions it defines that take no arguments are
called, and the unittest TestCases it defines are run. A block titled with a file name
(```python title="my_model.py") is written to that file instead, in the directory the blocks
run in. In ```bash blocks, every `jgc ...` and `python -m jgc ...` line runs there too and must
exit 0; `pip install` and `pytest` lines are the set-up that CI runs itself (and
tests/test_pytest_plugin.py runs the README's plugin example).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
import unittest
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)
TITLE = re.compile(r'title="([^"]+)"')
SET_UP = ("pip ", "pytest")  # run by CI itself, or by tests/test_pytest_plugin.py
# JAX's persistent-cache settings, which jgc.enable_compilation_cache changes on request.
CACHE_SETTINGS = [k for k in jax.config.values
                  if k.startswith(("jax_compilation_cache", "jax_persistent_cache"))]


def blocks(path: Path) -> list[tuple[str, str | None, str]]:
    """(language, file name or None, code) of each fenced block with a language."""
    return [(lang, (TITLE.search(info) or [None, None])[1], code)
            for lang, info, code in FENCE.findall(path.read_text())]


def test_every_documentation_file_is_collected():
    names = {p.name for p in FILES}
    assert {"README.md", "guide.md", "performance.md", "verdict-quality.md",
            "reliability.md", "architecture.md"} <= names, names
    assert all(any(lang == "python" for lang, _, _ in blocks(p)) for p in FILES
               if p.name in {"README.md", "guide.md", "performance.md"})


def test_the_readme_stays_short():
    """The README is the way in; everything longer belongs in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@contextlib.contextmanager
def _cache_settings_restored():
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    saved = {k: jax.config.values[k] for k in CACHE_SETTINGS}
    try:
        yield
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        jax_cache.reset_cache()


def _run_tests_defined(namespace: dict, before: set, where: str) -> None:
    for name, obj in list(namespace.items()):
        if name in before:
            continue
        if (name.startswith("test") and inspect.isfunction(obj)
                and not inspect.signature(obj).parameters):
            obj()
        elif isinstance(obj, type) and issubclass(obj, unittest.TestCase):
            result = unittest.TextTestRunner(stream=io.StringIO()).run(
                unittest.defaultTestLoader.loadTestsFromTestCase(obj))
            assert result.wasSuccessful() and result.testsRun, (where, result.failures,
                                                                 result.errors)


def _run_command(line: str, cwd: Path, where: str) -> None:
    words = shlex.split(line.split(" #")[0])
    if words[0] == "jgc":
        words = [sys.executable, "-m", "jgc", *words[1:]]
    elif words[:3] == ["python", "-m", "jgc"]:
        words = [sys.executable, *words[1:]]
    else:
        raise AssertionError(f"{where}: no rule to run {line!r} (tests/test_docs.py)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (where, line, done.stdout[-2000:], done.stderr[-2000:])


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_documentation_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # A single process stands in for the distributed example's cluster.
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: None)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    with (_cache_settings_restored(), jax.numpy_rank_promotion("allow"),
          jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(io.StringIO())):
        for i, (lang, title, code) in enumerate(blocks(path)):
            where = f"{path.name}, block {i + 1}"
            if lang == "python" and title:
                (tmp_path / title).write_text(code)
            elif lang == "python":
                before = set(namespace)
                exec(compile(code, where, "exec"), namespace)
                _run_tests_defined(namespace, before, where)
            elif lang == "bash":
                for line in code.splitlines():
                    if line.strip() and not line.startswith(SET_UP):
                        _run_command(line, tmp_path, where)
