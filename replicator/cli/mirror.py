"""`replicator mirror SRC DST`: a receiver and an agent in one process over loopback gRPC.

DST ends up holding exactly SRC's tree. Nothing of the tool's own is written in DST: the
state lives in --state-dir, by default `$XDG_STATE_HOME/replicator/mirror-<hash>`, one per
(SRC, DST) pair so that two mirrors never share state.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from replicator.cli.common import add_logging_options, setup_logging
from replicator.config import (
    DEFAULT_BLOCK_SIZE,
    DatasetConfig,
    compress_for,
    parse_hostport,
    parse_size,
)
from replicator.errors import UsageError

SOURCE_ID = "local"
DATASET = "mirror"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mirror", help="mirror directory SRC into DST continuously")
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dst", type=Path, metavar="DST")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the dashboard, /status, /metrics")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="state (default: $XDG_STATE_HOME/replicator/mirror-<hash>)")
    p.add_argument("--block-size", default=str(DEFAULT_BLOCK_SIZE), help=argparse.SUPPRESS)
    p.add_argument("--rescan-interval", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="exclude paths matching GLOB (relative to SRC); repeatable")
    add_logging_options(p)
    p.set_defaults(run=run)


def default_state_dir(src: Path, dst: Path) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    key = hashlib.sha256(f"{src}\0{dst}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return base / "replicator" / f"mirror-{key}"


def _check(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    src = args.src.expanduser().resolve()
    dst = args.dst.expanduser().resolve()
    if not src.is_dir():
        raise UsageError(f"SRC {args.src} is not a directory")
    if src == dst or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise UsageError("SRC and DST must not contain each other")
    state = (args.state_dir.expanduser().resolve() if args.state_dir
             else default_state_dir(src, dst))
    if state.is_relative_to(dst) or state.is_relative_to(src):
        raise UsageError("--state-dir must be outside SRC and DST")
    if args.http:
        try:
            parse_hostport(args.http)
        except ValueError as e:
            raise UsageError(f"--http: {e}") from None
    return src, dst, state


def run(args: argparse.Namespace) -> int:
    # here, not at the top: `replicator status` and --help need none of it
    import asyncio

    from replicator.agent.agent import Agent
    from replicator.daemon import lock_state_dir, notify, serve
    from replicator.observe.http import json_route, serving
    from replicator.observe.views import daemon_routes, receiver_registry
    from replicator.receiver.receiver import Receiver

    src, dst, state = _check(args)
    try:
        block_size = parse_size(args.block_size)
    except ValueError as e:
        raise UsageError(f"--block-size: {e}") from None
    setup_logging(args)
    lock_state_dir(state)
    # one process for both halves: the applier keeps the interpreter lock in its quick calls
    receiver = Receiver(state / "receiver", lambda s, d: dst, hold_lock=True)

    async def main() -> None:
        try:
            port = await receiver.start("127.0.0.1:0")
            address = f"127.0.0.1:{port}"
            agent = Agent(SOURCE_ID, address, state / "agent",
                          (DatasetConfig(DATASET, "directory", src, tuple(args.exclude)),),
                          block_size=block_size, rescan_interval=args.rescan_interval,
                          compress=compress_for("auto", address))
            routes = daemon_routes(receiver.status_document,
                                   receiver_registry(receiver, agent.counters))
            routes["/agent/status"] = json_route(agent.status_document)
            async with serving(args.http, routes):
                task = asyncio.ensure_future(agent.run())
                notify("READY=1")
                await task
        finally:
            await receiver.stop()

    return serve(main)
