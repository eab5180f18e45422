"""The command line: jgc demo, --version, --help, python -m jgc."""

import subprocess
import sys

import jgc
from jgc._src.surfaces import cli


def test_demo_prints_both_reports_and_the_difference(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "1) The correct hand-written backprop" in out
    assert "jgc gradient check: OK" in out and "jgc gradient check: MISMATCH" in out
    assert "The difference: the correct backprop passes every entry" in out
    assert "names the pattern (scale, factor 4)" in out


def test_demo_numpy_flavour(capsys):
    assert cli.main(["demo", "--numpy"]) == 0
    assert "evaluated it on the host, one perturbation at a time" in capsys.readouterr().out


def test_version_help_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "jgc", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"jgc {jgc.__version__}"
    helptext = subprocess.run([sys.executable, "-m", "jgc", "check", "--help"],
                              capture_output=True, text=True, check=True).stdout
    for flag in ("--json", "--x64", "--mode", "--eps", "--loss", "--debug"):
        assert flag in helptext
    bare = subprocess.run([sys.executable, "-m", "jgc"], capture_output=True, text=True)
    assert bare.returncode == 2 and "usage" in bare.stderr
