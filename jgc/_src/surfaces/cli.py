"""The command line: `jgc demo` and `jgc check FILE` (also `python -m jgc ...`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from jgc._src.report.vocab import Method, Mode
from jgc._src.version import __version__

DEMO_BUG = "b1_4_over_m"


def demo(args) -> int:
    """A small network checked twice: with a correct backprop, then with a planted bug."""
    import numpy as np

    import jgc
    from jgc.examples import mlp

    xp = np if args.numpy else None
    ex = mlp("tanh") if xp is None else mlp("tanh", xp=np)
    bug = ex.bugs[DEMO_BUG]
    rule = "=" * 78
    print(f"{rule}\njgc demo: {ex.description}.\n"
          "Loss: L = 1/(2m) Σ (tanh(X·W1 + b1)·W2 + b2 - Y)², params {W1, b1, W2, b2}.\n"
          f"{rule}\n")
    print("1) The correct hand-written backprop:\n")
    good = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=ex.grad, x64=args.x64)
    print(good, "\n")
    print(f"2) The same backprop with a planted bug ({bug.description}):\n")
    bad = jgc.check_grad(ex.loss, ex.params, *ex.args, grad=bug.grad, x64=args.x64)
    print(bad, "\n")
    print(rule)
    leaf = bad.bad_leaves[0] if bad.bad_leaves else None
    if good.ok and leaf is not None:
        print(f"The difference: the correct backprop passes every entry (global relative error "
              f"{good.global_rel_error:.1e}).\nThe buggy one fails only in {leaf.path}, "
              f"whose worst entry {leaf.worst_index} is {leaf.checked:.6g} where finite "
              f"differences give {leaf.numerical:.6g};\njax.grad agrees with finite "
              f"differences, so jgc blames the hand-written gradient and names the pattern "
              f"({leaf.pattern}, factor {leaf.factor:.3g}).")
        return 0
    print("Unexpected: the demo did not behave as designed. Please report this.",
          file=sys.stderr)
    return 1


class UsageError(Exception):
    """A problem with the command line or the user's file: exit status 2, one line on stderr."""


def _environment() -> None:
    """JGC_COMPILATION_CACHE, strictly: importing jgc only warns about a directory it cannot
    create, while a command that was asked for a cache it cannot have is a usage error."""
    from jgc._src.evaluators.diskcache import enable_from_environment
    from jgc._src.stages.split import InputError

    try:
        enable_from_environment(strict=True)
    except InputError as e:
        raise UsageError(str(e)) from e


def _load(path: str) -> dict:
    """Runs the user's file. Anything that ends the import early is a usage error (exit 2):
    an exception, sys.exit with any status (a 0 there would read as "all gradients fine"),
    or Ctrl-C (exit 130, without a traceback). Its prints go to stderr (see `_user_output`)."""
    import runpy

    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory. Pass a Python file that defines `loss` and "
                         "`params` (and optionally `args` and `grad`).")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file. Pass a Python file that defines `loss` and "
                         "`params` (and optionally `args` and `grad`).")
    try:
        with _user_output():
            return runpy.run_path(path, run_name="__jgc_check__")
    except SyntaxError as e:
        raise UsageError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except SystemExit as e:
        raise UsageError(f"{path} called sys.exit({e.code!r}) while being imported, so nothing "
                         "was checked. Guard script code with `if __name__ == '__main__':` "
                         "(jgc imports the file under another name).") from e
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise UsageError(f"{path}: importing it raised {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _user_output():
    """The user's own output (prints at import, jax.debug.print in the loss) goes to stderr, so
    that stdout holds only jgc's report: a JSON document with --json."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _get(ns: dict, name: str, what: str, path: str, required: bool = True):
    if name not in ns:
        if not required:
            return None
        found = sorted(k for k, v in ns.items() if not k.startswith("_") and
                       not isinstance(v, type(os)))
        raise UsageError(f"{path} defines no `{name}` ({what}); it defines: "
                         f"{', '.join(found) or 'nothing'}. Name it `{name}` or pass "
                         f"--{what.split()[0]} NAME.")
    return ns[name]


def check(args) -> int:
    """Runs check_grad on a user's file; 0 all well, 1 mismatch, 2 usage or input error."""
    import jgc

    ns = _load(args.file)
    loss = _get(ns, args.loss, "loss function", args.file)
    params = _get(ns, args.params, "params pytree", args.file)
    extra = _get(ns, args.args, "args tuple", args.file, required=False)
    grad = _get(ns, args.grad, "grad function or pytree", args.file, required=False)
    if not callable(loss):
        raise UsageError(f"{args.file}: `{args.loss}` is a {type(loss).__name__}, not a "
                         "function loss(params, *args) -> scalar.")
    if extra is None:
        extra = ()
    elif not isinstance(extra, tuple):
        raise UsageError(f"{args.file}: `{args.args}` must be a tuple of the loss's extra "
                         f"arguments, e.g. args = (X, y); got a {type(extra).__name__}.")
    try:
        with _user_output():
            report = jgc.check_grad(loss, params, *extra, grad=grad, x64=args.x64,
                                    mode=args.mode, eps=args.eps, method=args.method,
                                    has_aux=args.has_aux)
    except jgc.InputError as e:
        raise UsageError(str(e)) from e
    print(report.to_json(indent=2) if args.json else report)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jgc", description="jgc: is your gradient right, where is it wrong, and why.")
    parser.add_argument("--version", action="version", version=f"jgc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="check a small network's backprop, then the same with a bug")
    p.add_argument("--numpy", action="store_true",
                   help="use the NumPy version of the network (the slow host path)")
    p.add_argument("--x64", action=argparse.BooleanOptionalAction, default=True,
                   help="check in float64 (default) or at the parameters' precision")
    p.set_defaults(func=demo)
    c = sub.add_parser("check", help="check the gradient defined in a Python file",
                       description="Imports FILE, which defines `loss` and `params` (and "
                       "optionally `args`, a tuple, and `grad`), runs jgc.check_grad and prints "
                       "the report. Exit status: 0 all is well, 1 a mismatch, 2 a usage or "
                       "input error.")
    c.add_argument("file", help="a Python file defining loss and params")
    c.add_argument("--loss", default="loss", help="name of the loss function (default: loss)")
    c.add_argument("--params", default="params", help="name of the params (default: params)")
    c.add_argument("--args", default="args", help="name of the args tuple (default: args)")
    c.add_argument("--grad", default="grad",
                   help="name of the gradient to check (default: grad; absent: jax.grad)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--x64", action=argparse.BooleanOptionalAction, default=True,
                   help="check in float64 (default) or at the parameters' precision")
    c.add_argument("--mode", default=Mode.AUTO.value, choices=Mode.choices(),
                   help="which entries: " + "; ".join(f"{m}: {m.help}" for m in Mode)
                   + " (default: auto)")
    c.add_argument("--method", default=Method.CENTRAL.value, choices=Method.choices(),
                   help="the numerical derivative: " + "; ".join(f"{m}: {m.help}" for m in Method)
                   + " (default: central)")
    c.add_argument("--has-aux", action="store_true",
                   help="the loss returns (value, aux), as for jax.value_and_grad(has_aux=True)")
    c.add_argument("--eps", type=float, default=None, help="fixed step (default: automatic)")
    c.add_argument("--debug", action="store_true", help="show full tracebacks")
    c.set_defaults(func=check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        _environment()
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("jgc: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        if getattr(args, "debug", False):
            raise
        first = str(e).splitlines()[0]
        print(f"jgc: error: {first}", file=sys.stderr)
        rest = str(e).splitlines()[1:]
        if rest:
            print("\n".join("  " + line.strip() for line in rest), file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - never a raw traceback unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"jgc: error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
