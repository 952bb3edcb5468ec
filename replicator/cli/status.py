"""`replicator status [--url URL] [--json] [--max-lag SECONDS]`: a check for scripts and people.

Reads `/status` of a running agent or receiver and renders it (a table, or the JSON as
served). The exit code is the verdict, so that a failover script or a Nagios-style check
can rely on it:

- 0: every dataset is connected (`starting`, `catching_up` or `streaming`) and, with
  `--max-lag`, its replay lag is at most that many seconds; also when there are no datasets;
- 1: some dataset is over `--max-lag`, `disconnected`, in `error`, `fenced` or `promoted`;
- 2: the daemon cannot be reached or does not answer with a status document.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from replicator.config import DEFAULT_RECEIVER_HTTP
from replicator.errors import PeerUnavailable, UsageError

DEFAULT_URL = f"http://{DEFAULT_RECEIVER_HTTP}"
TIMEOUT = 5.0
CONNECTED_STATES = ("starting", "catching_up", "streaming")
COLUMNS = ("SOURCE", "DATASET", "STATE", "APPLIED", "WRITE LAG", "FLUSH LAG", "REPLAY LAG",
           "PENDING", "LAST CONTACT")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show (and check) the status of a running daemon")
    p.add_argument("--url", default=DEFAULT_URL,
                   help=f"the daemon's http address (default {DEFAULT_URL}); /status is added")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument("--max-lag", type=float, metavar="SECONDS",
                   help="exit 1 when some dataset's replay lag is above SECONDS")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.max_lag is not None and args.max_lag < 0:
        raise UsageError("--max-lag must not be negative")
    doc = fetch(args.url)
    problems = check(doc, args.max_lag)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(render(doc))
        for p in problems:
            print(f"problem: {p}")
    return 1 if problems else 0


def status_url(url: str) -> str:
    url = url if "://" in url else f"http://{url}"
    return url if url.rstrip("/").endswith("/status") else url.rstrip("/") + "/status"


def fetch(url: str) -> dict[str, Any]:
    # here: every command imports this module (for its parser), only this one fetches
    import urllib.error
    import urllib.request

    target = status_url(url)
    try:
        with urllib.request.urlopen(target, timeout=TIMEOUT) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise PeerUnavailable(f"{target}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PeerUnavailable(f"cannot reach {target}: {reason}") from None
    except ValueError as e:
        raise PeerUnavailable(f"{target}: not a status document: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list):
        raise PeerUnavailable(f"{target}: not a status document")
    return doc


def check(doc: dict[str, Any], max_lag: float | None) -> list[str]:
    """What keeps the verdict from being 0, one line per dataset at fault."""
    problems = []
    for d in doc["datasets"]:
        label = f"{d.get('source')}/{d.get('dataset')}"
        state = d.get("state")
        lag = d.get("replay_lag_seconds")
        if state not in CONNECTED_STATES:
            why = f": {d['error']}" if d.get("error") else ""
            problems.append(f"{label} is {state}{why}")
        elif lag is None:
            problems.append(f"{label}: replay lag unknown")
        elif max_lag is not None and lag > max_lag:
            problems.append(f"{label}: replay lag {_seconds(lag)} is above {_seconds(max_lag)}")
    return problems


def render(doc: dict[str, Any]) -> str:
    now = float(doc.get("now") or time.time())
    head = f"{doc.get('role', '?')} {doc.get('version', '?')}"
    if not doc["datasets"]:
        return f"{head}: no datasets"
    rows = [COLUMNS]
    for d in doc["datasets"]:
        contact = d.get("last_contact_at")
        rows.append((
            str(d.get("source")), str(d.get("dataset")), str(d.get("state")),
            str(d.get("applied_lsn")), _seconds(d.get("write_lag_seconds")),
            _seconds(d.get("flush_lag_seconds")), _seconds(d.get("replay_lag_seconds")),
            f"{_bytes(d.get('pending_bytes') or 0)} / {d.get('pending_changes', 0)}",
            "never" if not contact else f"{_seconds(max(0.0, now - contact))} ago",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    return "\n".join([head, *lines])


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f}ms"
    if v < 120:
        return f"{v:.1f}s"
    if v < 7200:
        return f"{v / 60:.1f}m"
    return f"{v / 3600:.1f}h"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"
