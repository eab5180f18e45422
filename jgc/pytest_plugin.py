"""jgc's pytest plugin: a compilation cache for the session, failing checks' reports, a summary.

pytest finds it through the `pytest11` entry point wherever jgc is installed (`-p no:jgc` turns
it off). Without its options or its fixture it only counts the checks that tests make, and it
imports JAX only when a test does.

Options:
  --jgc-cache[=DIR]: JAX's persistent compilation cache in DIR (default: jgc's,
    ~/.cache/jgc/xla) for the session, small programs included: a second run reuses what the
    first compiled. pytest-xdist workers share the directory.
  --jgc-reports=DIR: every failing check made during a test is written to
    DIR/<test node id>.html and .json (-1, -2, ... when a test has several).
  --jgc-reports-all: with --jgc-reports, the passing checks are written too.

Fixture:
  jgc_check: `jgc.assert_grad`. Plain calls of jgc's checks inside a test are recorded as well.

At the end, a line in the terminal summary:
`jgc: 12 gradient checks, 1 failed, 0 unresolved, 3.4 s in jgc (reports: out/)`.

Under pytest-xdist each worker records the checks of the tests it runs and writes their reports
itself. It attaches the counts and the reports' names to the test's teardown report, as a JSON
user property named "jgc" (junitxml writes it too), and the controller adds the counts up for
the summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import os
import re
from pathlib import Path

import pytest

import jgc
from jgc._src.evaluators.diskcache import compilation_cache, default_cache_dir
from jgc._src.surfaces import recording

PROPERTY = "jgc"  # the name of the per-test counts in a teardown report's user_properties
_MAX_STEM = 120  # longer node ids are cut, and told apart by a hash
_RECORDER = pytest.StashKey[recording.Recorder]()  # the recorder of the test an item runs


@dataclasses.dataclass(frozen=True)
class _Options:
    """The directories the options name, resolved against the invocation directory."""

    cache: Path | None
    reports: Path | None
    reports_all: bool

    @property
    def any(self) -> bool:
        return self.cache is not None or self.reports is not None


@dataclasses.dataclass
class _Totals:
    """The counts of the whole run, added up from the tests' teardown reports."""

    checks: int = 0
    failed: int = 0
    unresolved: int = 0
    raised: int = 0
    seconds: float = 0.0

    def add(self, counts: dict) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + counts.get(field.name, 0))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jgc", "jgc gradient checks")
    group.addoption(
        "--jgc-cache", nargs="?", const="", default=None, metavar="DIR",
        help="keep compiled programs in JAX's persistent compilation cache for the session, in "
             f"DIR (default: {default_cache_dir()}), shared by xdist workers; give DIR with "
             "'=' (--jgc-cache=DIR).")
    group.addoption(
        "--jgc-reports", default=None, metavar="DIR",
        help="write every failing jgc check made during a test to DIR, as HTML and JSON named "
             "after the test's node id.")
    group.addoption(
        "--jgc-reports-all", action="store_true", default=False,
        help="with --jgc-reports: write the passing checks too.")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_Session(config, _options(config)), "jgc-session")


@pytest.fixture
def jgc_check() -> _Check:
    """`jgc.assert_grad(loss, params, *args, grad=None, **options)`: returns the Report, or
    raises AssertionError naming every bad leaf. The check is counted in jgc's summary line and,
    with --jgc-reports, written when it fails."""
    return _Check()


class _Check:
    """The jgc_check fixture's value: jgc.assert_grad, with a short repr for tracebacks."""

    def __call__(self, loss, params, *args, **options):
        __tracebackhide__ = True  # pytest's traceback starts at the test's line
        return jgc.assert_grad(loss, params, *args, **options)

    def __repr__(self) -> str:
        return "jgc_check (jgc.assert_grad)"


class _Session:
    """The plugin's state for one pytest session: the options, the cache, the totals."""

    def __init__(self, config: pytest.Config, options: _Options) -> None:
        self.config = config
        self.options = options
        self.is_worker = hasattr(config, "workerinput")  # a pytest-xdist worker
        self.totals = _Totals()
        self._cache = contextlib.ExitStack()
        if options.cache is not None and _runs_tests(config):
            self._cache.enter_context(compilation_cache(options.cache))

    def pytest_unconfigure(self) -> None:
        self._cache.close()

    def pytest_report_header(self) -> str | None:
        if self.options.cache is None:
            return None
        return f"jgc: compilation cache in {_shown(self.options.cache, self.config)}"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item):
        with recording.listening() as recorder:
            item.stash[_RECORDER] = recorder
            yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        recorder = item.stash.get(_RECORDER, None)
        if call.when != "teardown" or recorder is None:
            return
        records = recorder.take()
        if not records:
            return
        written = []
        if self.options.reports is not None:
            try:
                written = _write_reports(self.options.reports, item.nodeid, records,
                                         self.options.reports_all)
            except OSError as e:
                item.warn(pytest.PytestWarning(
                    f"jgc could not write this test's reports to {self.options.reports}: "
                    f"{type(e).__name__}: {e}"))
        counts = {**_counts(records), "reports": written}
        outcome.get_result().user_properties.append((PROPERTY, json.dumps(counts)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker or report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                self.totals.add(json.loads(value))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        t = self.totals
        if self.is_worker or not (t.checks or t.raised or self.options.any):
            return
        terminalreporter.write_line(_summary(t, self.options, self.config))


def _options(config: pytest.Config) -> _Options:
    """The options, their directories created (pytest.UsageError when one cannot be)."""
    cache, reports = config.getoption("jgc_cache"), config.getoption("jgc_reports")
    reports_all = config.getoption("jgc_reports_all")
    if reports_all and reports is None:
        raise pytest.UsageError("--jgc-reports-all says which checks to write, and needs "
                                "--jgc-reports=DIR to say where.")
    if cache and "--jgc-cache" in config.invocation_params.args:  # "--jgc-cache tests/"
        raise pytest.UsageError(
            f"--jgc-cache takes its directory after '=': write --jgc-cache={cache} to keep the "
            "cache there, or put --jgc-cache after the test paths for jgc's directory.")
    base = config.invocation_params.dir
    return _Options(
        cache=None if cache is None else _directory(base, cache or default_cache_dir(),
                                                    "--jgc-cache"),
        reports=None if reports is None else _directory(base, reports, "--jgc-reports"),
        reports_all=reports_all)


def _directory(base: Path, value: str | os.PathLike, option: str) -> Path:
    """`value` as a writable directory (relative to `base`), created if needed."""
    if not str(value).strip():
        raise pytest.UsageError(f"{option}= needs a directory after the '='.")
    directory = base / Path(value).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise pytest.UsageError(
            f"{option}: the directory {str(directory)!r} cannot be created "
            f"({type(e).__name__}: {e.strerror or e}); give {option}=DIR a writable "
            "directory.") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise pytest.UsageError(f"{option}: the directory {str(directory)!r} is not writable; "
                                f"give {option}=DIR a writable directory.")
    return directory


def _runs_tests(config: pytest.Config) -> bool:
    """Whether this process runs tests: not a pytest-xdist controller (which has workers)."""
    return hasattr(config, "workerinput") or config.getoption("dist", "no") == "no"


def _counts(records: tuple[recording.Record, ...]) -> dict:
    """One test's checks as plain numbers, which a worker sends its controller."""
    reports = [r.report for r in records if r.report is not None]
    return {
        "checks": len(reports),
        "failed": sum(not r.ok and r.verdict != "unresolved" for r in reports),
        "unresolved": sum(r.verdict == "unresolved" for r in reports),
        "raised": len(records) - len(reports),
        "seconds": sum(r.seconds for r in records),
    }


def _summary(t: _Totals, options: _Options, config: pytest.Config) -> str:
    """jgc: 12 gradient checks, 1 failed, 0 unresolved, 3.4 s in jgc (reports: out/)"""
    words = [f"{t.checks} gradient check{'s' * (t.checks != 1)}", f"{t.failed} failed",
             f"{t.unresolved} unresolved"]
    if t.raised:
        words.append(f"{t.raised} raised an error")
    where = []
    if options.reports is not None:
        where.append(f"reports: {_shown(options.reports, config)}")
    if options.cache is not None:
        where.append(f"cache: {_shown(options.cache, config)}")
    return (f"jgc: {', '.join(words)}, {t.seconds:.1f} s in jgc"
            + (f" ({'; '.join(where)})" if where else ""))


def _shown(directory: Path, config: pytest.Config) -> str:
    """A directory as the summary shows it: relative to where pytest was run when inside it,
    else to the home directory (~/.cache/jgc/xla/)."""
    for base, prefix in ((config.invocation_params.dir, ""), (Path.home(), f"~{os.sep}")):
        with contextlib.suppress(ValueError):
            return f"{prefix}{directory.relative_to(base)}{os.sep}"
    return f"{directory}{os.sep}"


def _write_reports(directory: Path, nodeid: str, records: tuple[recording.Record, ...],
                   everything: bool) -> list[str]:
    """Writes one test's failing checks (all of them if `everything`) as HTML and JSON files;
    returns their names, without the extension."""
    chosen = [(i, r) for i, r in enumerate(records, 1)
              if r.report is not None and (everything or not r.report.ok)]
    stem = file_stem(nodeid)
    names = [stem] if len(chosen) == 1 else [f"{stem}-{k}" for k in range(1, len(chosen) + 1)]
    for name, (index, record) in zip(names, chosen):
        (directory / f"{name}.html").write_text(_html(nodeid, record, index), encoding="utf-8")
        (directory / f"{name}.json").write_text(_json(nodeid, record, index), encoding="utf-8")
    return names


def file_stem(nodeid: str) -> str:
    """A test's node id as a file name: every character other than letters, digits, '.', '-'
    and '_' becomes '_'; a long one is cut and ends in a hash of the whole id.

    >>> file_stem("tests/test_net.py::test_backward[relu-64]")
    'tests_test_net.py__test_backward_relu-64_'
    """
    stem = re.sub(r"[^\w.-]", "_", nodeid)
    if len(stem) <= _MAX_STEM:
        return stem
    digest = hashlib.sha1(nodeid.encode()).hexdigest()[:10]
    return f"{stem[:_MAX_STEM - 11]}-{digest}"


def _json(nodeid: str, record: recording.Record, index: int) -> str:
    """report.to_json's fields, after the test's node id, the surface and the check's number."""
    return json.dumps({"nodeid": nodeid, "surface": record.surface, "check": index,
                       **record.report.to_dict()}, indent=2)


def _html(nodeid: str, record: recording.Record, index: int) -> str:
    """The report's notebook view as a complete HTML document, titled with the test."""
    title = html.escape(f"{nodeid}: {record.surface}, check {index}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
            f"<title>jgc: {title}</title></head>\n<body>\n"
            f"<h1 style=\"font-family:sans-serif;font-size:110%\">{title}</h1>\n"
            f"{record.report._repr_html_()}\n</body>\n</html>\n")
