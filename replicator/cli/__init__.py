"""The `replicator` command: one module per subcommand, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

from replicator import __version__
from replicator.cli.common import print_traceback
from replicator.errors import ReplicatorError

# module names under replicator.cli; each registers its command (allow_empty: allow-empty)
COMMANDS = ("receiver", "agent", "mirror", "status", "promote", "allow_empty")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # usage errors exit 2 with one line, as every other error
        self.exit(2, f"replicator: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="replicator", description="Continuous replication to a DR site.")
    parser.add_argument("--version", action="version", version=f"replicator {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"replicator.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except ReplicatorError as e:
        print(f"replicator {args.command}: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 0
    except BaseException as e:  # a bug or an unexpected OS failure: one line, exit 2
        if isinstance(e, SystemExit):
            raise
        cause = _innermost(e)
        # the log formatters keep one line per event, so the traceback is printed here,
        # whole, before the summary line; only when asked for, as it is many lines
        debug = getattr(args, "log_level", None) == "debug"
        if debug:
            print_traceback(args, e)
        hint = (" (run with --log-level debug for the traceback)"
                if hasattr(args, "log_level") and not debug else "")
        print(f"replicator {args.command}: unexpected error: {type(cause).__name__}: "
              f"{cause}{hint}", file=sys.stderr)
        return 2


def _innermost(e: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e
