"""Options and set-up shared by the daemon commands: logging."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 6), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc)


class _TextFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]  # typeshed: gmtime takes a float

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s",
                         "%Y-%m-%dT%H:%M:%S")

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def, override]
        # one line per event: the exception's last line only
        return " | " + super().formatException(ei).splitlines()[-1]

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if args.log_format == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.log_level.upper())
    logging.getLogger("watchdog").setLevel(logging.WARNING)
