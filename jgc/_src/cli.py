"""The command line: `jgc demo` (and `python -m jgc demo`)."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
