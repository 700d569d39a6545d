"""`qwen-fast`, the command line (also `python -m qwen_fast`).

    qwen-fast demo [--model PATH] [--batch B] [--new-tokens N] [--backend B]   transformers vs qwen_fast.patch
    qwen-fast check [--ops OP ...] [--backends B ...] [--quick] [--json PATH]   environment, backends, self-test
    qwen-fast bench [BENCH_DIR] [--out DIR] [-k EXPR] [--quick]                 bench/ suites, bench.json, plots

With no subcommand it prints the environment and the backends table (`check`'s report, without the self-test).
Each subcommand is a module of this package with `add_parser(subparsers)` and `run(args) -> int`; adding one is a
new module and one entry in COMMANDS (its parser's description: the module docstring, printed as written).
"""

import argparse
import functools
import sys

from qwen_fast import __version__
from qwen_fast.cli import bench, check, demo

COMMANDS = (demo, check, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-fast",
        description="qwen_fast: fast kernels for Qwen3-MoE-style inference. With no command: the environment and "
        "which backends serve each op here.",
        epilog="`qwen-fast COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"qwen-fast {__version__}")
    # A command's description is its module docstring, printed as written.
    command_parser = functools.partial(argparse.ArgumentParser, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=command_parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen command, return its exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        print(check.report())
        return 0
    return args.run(args)
