"""`replicator receiver --config FILE`: the receiver daemon, in the foreground."""

from __future__ import annotations

import argparse
import logging

from replicator.cli.common import add_logging_options, setup_logging
from replicator.config import load_receiver

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("receiver", help="run the receiver daemon (DR site)")
    p.add_argument("--config", required=True, help="receiver configuration (TOML)")
    add_logging_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: `replicator status` and --help need none of it
    import asyncio

    from replicator.daemon import lock_state_dir, notify, serve, server_credentials
    from replicator.observe.http import serving
    from replicator.observe.mqtt import publishing
    from replicator.observe.views import daemon_routes, receiver_registry
    from replicator.receiver.receiver import Receiver

    config = load_receiver(args.config)
    setup_logging(args)
    lock_state_dir(config.state_dir)
    credentials = server_credentials(config.tls)
    receiver = Receiver(config.state_dir, lambda s, d: config.mirror_root / s / d,
                        sources=config.sources,
                        require_client_identity=bool(config.tls and config.tls.client_ca))

    async def main() -> None:
        try:
            await receiver.start(config.listen, credentials)
            routes = daemon_routes(receiver.status_document, receiver_registry(receiver))
            async with serving(config.http, routes), \
                    publishing(config.mqtt, "receiver", None, receiver.status_rows):
                notify("READY=1")
                await asyncio.Event().wait()
        finally:
            await receiver.stop()

    return serve(main)
