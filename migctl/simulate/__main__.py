"""`python -m migctl.simulate ...`: the `migctl simulate` sub-command on its own."""

from __future__ import annotations

import argparse

from migctl.simulate.cli import register, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migctl")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub)
    args = parser.parse_args(["simulate", *(argv if argv is not None else _argv())])
    return run(args)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    raise SystemExit(main())
