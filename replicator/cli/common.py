"""Options and set-up shared by the daemon commands: logging, and tracebacks in its format."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback


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


def print_traceback(args: argparse.Namespace, e: BaseException) -> None:
    """`e`'s traceback on stderr, whole: plain text, or with --log-format json one JSON
    object (the traceback's lines in `traceback`) so that the log stays a JSON line per
    event for whatever ships it."""
    lines = traceback.format_exception(e)
    if getattr(args, "log_format", "text") != "json":
        sys.stderr.write("".join(lines))
        return
    doc = {"ts": round(time.time(), 6), "level": "debug", "logger": "replicator.cli",
           "msg": f"unexpected error: {type(e).__name__}: {e}",
           "traceback": "".join(lines).splitlines()}
    print(json.dumps(doc), file=sys.stderr)


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
