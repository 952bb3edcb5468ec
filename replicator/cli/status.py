"""`replicator status`."""

from __future__ import annotations

import argparse

from replicator.errors import ReplicatorError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="(not yet available)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise ReplicatorError("'status' is not implemented yet")
