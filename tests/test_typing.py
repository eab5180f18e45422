"""The public API type-checks as a user writes it (mypy, PEP 561: jgc ships py.typed)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

USER_CODE = textwrap.dedent('''
    import jax.numpy as jnp
    import numpy as np

    import jgc


    def loss(p: dict, x: np.ndarray) -> jnp.ndarray:
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)


    params = {"w": np.ones((3, 2))}
    x = np.ones((4, 3))
    report: jgc.Report = jgc.check_grad(loss, params, x, mode="full", x64=True, rtol=None,
                                        evaluator="dense")
    ok: bool = report.ok
    error: float = report.global_rel_error
    text: str = report.diagnosis
    for leaf in report.leaves:
        one: jgc.LeafReport = leaf
        path: str = leaf.path
        shape: tuple[int, ...] = leaf.shape
        status: str = leaf.status
        n: int = leaf.n_checked
        worst: tuple[int, ...] | None = leaf.worst_index
        pattern: str | None = leaf.pattern
    as_dict: dict = report.to_dict()
    jgc.assert_grad(loss, params, x)
    g = jgc.numerical_grad(loss, params, x)
    r2: jgc.Report = jgc.check_vjp(lambda a: a * 2, lambda c, a: (2 * c,), (np.ones(3),))
    r3: jgc.Report = jgc.check_jvp(jnp.sin, None, (np.ones(3),))
    r4: jgc.Report = jgc.check_hvp(loss, params, x)
    try:
        jgc.check_grad(loss, params, x, mode="bogus")
    except jgc.InputError as e:
        message: str = str(e)
    version: str = jgc.__version__
    jgc.enable_compilation_cache()
''')


def _mypy(tmp_path, code: str) -> subprocess.CompletedProcess:
    script = tmp_path / "user.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports",
         "--cache-dir", os.devnull, str(script), str(ROOT / "jgc" / "__init__.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_the_public_api_type_checks(tmp_path):
    pytest.importorskip("mypy")
    out = _mypy(tmp_path, USER_CODE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found in 2 source files" in out.stdout


def test_a_misuse_of_the_public_api_is_a_type_error(tmp_path):
    """The check above can fail: a report's `ok` is a bool, not a str."""
    pytest.importorskip("mypy")
    out = _mypy(tmp_path, USER_CODE + "wrong: str = report.ok\n")
    assert out.returncode == 1 and 'expression has type "bool", variable has type "str"' in \
        out.stdout, out.stdout + out.stderr


def test_jgc_ships_py_typed():
    assert (ROOT / "jgc" / "py.typed").is_file()
