"""jgc's pytest plugin, run on a user's test file in a temporary directory (pytester): the
summary line, the reports, the fixture, the compilation cache, pytest-xdist, the README's
example."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import jax
import pytest

from jgc import pytest_plugin
from jgc._src.surfaces import check

pytest_plugins = "pytester"

# pytester's in-process runs drop from sys.modules what was first imported during them, while
# jgc's packages keep those copies as attributes: importing jgc's checks here, before any run,
# keeps one copy of them in this process.
assert check.check_grad

README = Path(__file__).resolve().parents[1] / "README.md"

# A user's tests: 6 checks (3 fail, 1 unresolved) and 1 that raises, through the fixture, plain
# assert_grad and plain check_grad. Outcomes: 5 passed, 2 failed.
USER_TESTS = """
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

P = np.linspace(-1.0, 1.0, 4)


def loss(p):
    return jnp.sum(jnp.tanh(p) ** 2)


def grad(p):
    return 2 * jnp.tanh(p) * (1 - jnp.tanh(p) ** 2)


def test_fixture_passes(jgc_check):
    assert jgc_check(loss, P, grad=grad).ok


def test_fixture_fails(jgc_check):
    jgc_check(loss, P, grad=lambda p: 2 * grad(p))


def test_assert_grad_fails():
    jgc.assert_grad(loss, P, grad=lambda p: -grad(p))


def test_check_grad_unresolved():  # the gradient is below the loss's rounding
    assert jgc.check_grad(lambda w: 1 + 1e-14 * jnp.sum(w), np.ones(3)).verdict == "unresolved"


def test_two_checks_one_failing():
    assert jgc.check_grad(loss, P).ok
    assert not jgc.check_grad(loss, P, grad=lambda p: 3 * grad(p)).ok


def test_bad_input_raises():
    with pytest.raises(jgc.InputError):
        jgc.check_grad(loss, P, mode="nonsense")


def test_no_check():
    pass
"""
SUMMARY = (r"jgc: 6 gradient checks, 3 failed, 1 unresolved, 1 raised an error, \d+\.\d s in "
           r"jgc")
FAILING = ["test_user.py__test_fixture_fails", "test_user.py__test_assert_grad_fails",
           "test_user.py__test_check_grad_unresolved", "test_user.py__test_two_checks_one_failing"]

# Counts JAX's persistent-cache requests and hits in the process running the tests; the fixture
# is the conftest's: the cache option must leave x64, the default device and gc as they were.
CACHE_PROBE = """
import gc, json, os
from pathlib import Path

import jax

EVENTS = []
jax.monitoring.register_event_listener(lambda name, **kw: EVENTS.append(name))


@pytest.fixture(autouse=True)
def _config_unchanged():
    before = (jax.config.jax_enable_x64, jax.config.jax_default_device, gc.isenabled())
    yield
    assert (jax.config.jax_enable_x64, jax.config.jax_default_device, gc.isenabled()) == before


@pytest.fixture(scope="module", autouse=True)
def _write_cache_events():
    yield
    hits = EVENTS.count("/jax/compilation_cache/cache_hits")
    asked = EVENTS.count("/jax/compilation_cache/compile_requests_use_cache")
    Path(os.environ["JGC_TEST_EVENTS"]).write_text(json.dumps({"hits": hits,
                                                               "misses": asked - hits}))
"""


def _summary_lines(result) -> list[str]:
    return [line for line in result.outlines if re.match(r"jgc: \d+ gradient check", line)]


def _written(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _files(names) -> list[str]:
    return sorted(f"{n}.{ext}" for n in names for ext in ("html", "json"))


def test_a_long_node_id_is_cut_and_told_apart_by_a_hash():
    a = pytest_plugin.file_stem("tests/test_x.py::test_y[" + "a" * 200 + "]")
    b = pytest_plugin.file_stem("tests/test_x.py::test_y[" + "a" * 199 + "b]")
    assert len(a) == len(b) == 120 and a != b and a.startswith("tests_test_x.py__test_y_aaa")


# The plugin.

def test_without_options_or_checks_it_prints_nothing_and_imports_no_jax(pytester):
    pytester.makepyfile(test_plain="""
        import sys

        def test_no_jax(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("jgc")
            assert "jax" not in sys.modules
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert _summary_lines(result) == []
    with_option = pytester.runpytest_subprocess("--jgc-reports=out")  # no JAX for this option
    with_option.assert_outcomes(passed=1)
    assert _summary_lines(with_option) == [
        "jgc: 0 gradient checks, 0 failed, 0 unresolved, 0.0 s in jgc (reports: out/)"]


def test_the_summary_counts_the_fixture_and_plain_calls(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest()
    result.assert_outcomes(passed=5, failed=2)
    (line,) = _summary_lines(result)
    assert re.fullmatch(SUMMARY, line), line


def test_reports_are_written_for_the_failing_checks_only(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("--jgc-reports=out", "--junitxml=junit.xml")
    result.assert_outcomes(passed=5, failed=2)
    (line,) = _summary_lines(result)
    assert re.fullmatch(SUMMARY + r" \(reports: out/\)", line), line
    out = pytester.path / "out"
    assert _written(out) == _files(FAILING)
    report = json.loads((out / "test_user.py__test_fixture_fails.json").read_text())
    assert report["nodeid"] == "test_user.py::test_fixture_fails"
    assert (report["surface"], report["check"]) == ("check_grad", 1)
    assert (report["ok"], report["verdict"]) == (False, "wrong_gradient")
    leaf = report["leaves"][0]
    assert leaf["pattern"] == "scale" and leaf["factor"] == pytest.approx(2)
    second = json.loads((out / "test_user.py__test_two_checks_one_failing.json").read_text())
    assert second["check"] == 2 and second["leaves"][0]["factor"] == pytest.approx(3)
    page = (out / "test_user.py__test_fixture_fails.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "test_user.py::test_fixture_fails: check_grad, check 1" in page
    assert "MISMATCH" in page and "<table" in page
    properties = re.findall(r'<property name="jgc" value="([^"]*)"',
                            (pytester.path / "junit.xml").read_text())
    per_test = [json.loads(html.unescape(v)) for v in properties]
    assert sum(t["checks"] for t in per_test) == 6 and len(per_test) == 6
    assert sorted(n for t in per_test for n in t["reports"]) == sorted(FAILING)


def test_a_report_that_cannot_be_written_is_a_warning(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    (pytester.path / "out" / "test_user.py__test_fixture_fails.html").mkdir(parents=True)
    result = pytester.runpytest("--jgc-reports=out")
    result.assert_outcomes(passed=5, failed=2, warnings=1)
    result.stdout.fnmatch_lines(["*PytestWarning: jgc could not write this test's reports to "
                                 "*out: IsADirectoryError*"])
    assert len(_summary_lines(result)) == 1  # the counts are kept


def test_reports_all_writes_the_passing_checks_too(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("--jgc-reports=out", "--jgc-reports-all")
    result.assert_outcomes(passed=5, failed=2)
    two = "test_user.py__test_two_checks_one_failing"
    expected = [*FAILING[:3], "test_user.py__test_fixture_passes", f"{two}-1", f"{two}-2"]
    assert _written(pytester.path / "out") == _files(expected)
    assert json.loads((pytester.path / "out" / f"{two}-1.json").read_text())["ok"] is True


@pytest.mark.parametrize("args, message", [
    (["--jgc-cache={blocker}/xla"], r"ERROR: --jgc-cache: the directory '.*blocker/xla' cannot "
                                    r"be created \(.*\); give --jgc-cache=DIR a writable "
                                    r"directory\."),
    (["--jgc-reports={blocker}"], r"ERROR: --jgc-reports: the directory '.*blocker' cannot be "
                                  r"created .*"),
    (["--jgc-reports-all"], r"ERROR: --jgc-reports-all says which checks to write, and needs "
                            r"--jgc-reports=DIR to say where\."),
    (["--jgc-cache", "test_user.py"], r"ERROR: --jgc-cache takes its directory after '=': write "
                                      r"--jgc-cache=test_user.py to keep the cache there, or put "
                                      r"--jgc-cache after the test paths for jgc's directory\."),
])
def test_a_bad_option_is_a_one_line_usage_error(pytester, args, message):
    (pytester.path / "blocker").write_text("a file, not a directory")
    pytester.makepyfile(test_user="def test_x(): pass")
    before = jax.config.jax_compilation_cache_dir
    result = pytester.runpytest(*(a.format(blocker=pytester.path / "blocker") for a in args))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and re.fullmatch(message, errors[0]), result.errlines
    assert jax.config.jax_compilation_cache_dir == before  # nothing was enabled


def test_the_cache_is_filled_then_reused_with_no_conftest(pytester, tmp_path, monkeypatch):
    """The issue's 'done when': `pytest --jgc-cache --jgc-reports=out`, jgc's default
    directory ($XDG_CACHE_HOME/jgc/xla), a second process compiling nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    pytester.makepyfile(test_user=USER_TESTS + CACHE_PROBE)
    directory = tmp_path / "home-cache" / "jgc" / "xla"
    runs = []
    for run in ("first", "second"):
        monkeypatch.setenv("JGC_TEST_EVENTS", str(tmp_path / f"{run}.json"))
        result = pytester.runpytest_subprocess("--jgc-reports=out", "--jgc-cache")
        result.assert_outcomes(passed=5, failed=2)
        (line,) = _summary_lines(result)
        assert re.fullmatch(SUMMARY + rf" \(reports: out/; cache: {directory}/\)", line), line
        assert f"jgc: compilation cache in {directory}/" in result.outlines
        runs.append((json.loads((tmp_path / f"{run}.json").read_text()),
                     sorted(p.name for p in directory.iterdir())))
    (first, filled), (second, kept) = runs
    assert first["misses"] > 0 and len(filled) >= first["misses"]
    assert second == {"hits": first["misses"], "misses": 0} and kept == filled
    assert _written(pytester.path / "out") == _files(FAILING)


def test_under_xdist_the_totals_and_reports_are_those_of_one_process(pytester, tmp_path):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "--jgc-reports=out",
                                           f"--jgc-cache={tmp_path / 'xla'}")
    result.assert_outcomes(passed=5, failed=2)
    (line,) = _summary_lines(result)  # printed once, by the controller
    assert re.fullmatch(SUMMARY + r" \(reports: out/; cache: .*/xla/\)", line), line
    assert _written(pytester.path / "out") == _files(FAILING)
    entries = list((tmp_path / "xla").iterdir())
    assert entries and all(p.name.endswith("-cache") for p in entries)  # no staging left


def test_the_readme_example_runs_as_it_says(pytester):
    """The README's test-suite example: its test file and its command line."""
    text = README.read_text().split("## In a test suite", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    command = re.search(r"```bash\n(pytest [^\n]*)", text).group(1).split("#")[0].split()
    pytester.makepyfile(test_layer=code)
    args = [a for a in command[1:] if not a.startswith("--jgc-cache")]  # no cache in-process
    # The README's loss adds a bias to a batch, as users write it under JAX's default rank
    # promotion, not the strict one this suite sets (jgc would refuse it, as tests/test_strict.py
    # shows): its in-process run gets the default back.
    with jax.numpy_rank_promotion("allow"):
        result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1, failed=1)
    (line,) = _summary_lines(result)
    assert re.fullmatch(r"jgc: 2 gradient checks, 1 failed, 0 unresolved, \d+\.\d s in jgc "
                        r"\(reports: out/\)", line), line
    assert _written(pytester.path / "out") == _files(["test_layer.py__test_bias_backward"])
