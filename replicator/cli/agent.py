"""`replicator agent`."""

from __future__ import annotations

import argparse

from replicator.errors import ReplicatorError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="(not yet available)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise ReplicatorError("'agent' is not implemented yet")
