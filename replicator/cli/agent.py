"""`replicator agent --config FILE`: the agent daemon, in the foreground."""

from __future__ import annotations

import argparse

from replicator.cli.common import add_logging_options, setup_logging
from replicator.config import load_agent


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the agent daemon (primary)")
    p.add_argument("--config", required=True, help="agent configuration (TOML)")
    add_logging_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: `replicator status` and --help need none of it
    import asyncio

    from replicator.agent.agent import Agent
    from replicator.daemon import channel_credentials, lock_state_dir, notify, serve
    from replicator.observe.http import serving
    from replicator.observe.mqtt import publishing
    from replicator.observe.views import agent_registry, daemon_routes

    config = load_agent(args.config)
    setup_logging(args)
    lock_state_dir(config.state_dir)
    agent = Agent.from_config(config, channel_credentials(config.tls))

    async def main() -> None:
        routes = daemon_routes(agent.status_document, agent_registry(agent))
        async with serving(config.http, routes), \
                publishing(config.mqtt, "agent", config.source_id, agent.status_rows):
            task = asyncio.ensure_future(agent.run())
            notify("READY=1")
            await task

    return serve(main)
