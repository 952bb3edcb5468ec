"""A stand-in for `replicator mirror` that speaks the same outside contract (arguments,
`/status`, `/metrics`, SIGTERM), so the harness can be tested without the real thing.

It polls SRC every 2 ms and copies any file whose size, mtime or ctime changed, one LSN per
copy; it reports `catching_up` until its first pass is done, `streaming` after.

`receiver --config R` and `agent --config A` play the two-process topology: the fake agent
only waits for SIGTERM, and the fake receiver does the copying, reading the agent's source
and dataset from the `agent.toml` beside its own config (a fake's shortcut).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

POLL = 0.002


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = "catching_up"
        self.lsn = 0
        self.wire = 0

    def status(self) -> dict[str, object]:
        with self.lock:
            return {"role": "mirror", "version": "fake", "now": time.time(), "datasets": [{
                "source": "local", "dataset": "fake", "type": "directory",
                "state": self.state, "epoch": 1, "written_lsn": self.lsn,
                "flushed_lsn": self.lsn, "applied_lsn": self.lsn, "pending_changes": 0,
                "pending_bytes": 0}]}


def serve(state: State, host: str, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body in one segment: else Nagle and delayed ACKs add 40 ms
        wbufsize = -1
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/status":
                body = json.dumps(state.status()).encode()
            elif self.path == "/metrics":
                body = ('replicator_bytes_total{source="local",dataset="fake",stage="raw"} '
                        f'{state.wire * 2}.0\n'
                        'replicator_bytes_total{source="local",dataset="fake",stage="wire"} '
                        f'{state.wire}.0\n').encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def copy_forever(state: State, src: Path, dst_root: Path) -> None:
    seen: dict[Path, tuple[int, int, int]] = {}
    while True:
        for dirpath, _, names in os.walk(src):
            for name in names:
                path = Path(dirpath, name)
                st = path.stat()
                key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                rel = path.relative_to(src)
                if seen.get(rel) == key:
                    continue
                dst = dst_root / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dst.with_name(dst.name + ".tmp"))
                os.replace(dst.with_name(dst.name + ".tmp"), dst)
                seen[rel] = key
                with state.lock:
                    state.lsn += 1
                    state.wire += st.st_size
        with state.lock:
            # FAKE_MIRROR_STATE=error plays a mirror whose applier has stopped
            state.state = os.environ.get("FAKE_MIRROR_STATE", "streaming")
        time.sleep(POLL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--version", action="store_true")
    p.add_argument("command", nargs="?")
    p.add_argument("src", nargs="?", type=Path)
    p.add_argument("dst", nargs="?", type=Path)
    p.add_argument("--http")
    p.add_argument("--state-dir")
    p.add_argument("--config", type=Path)
    args = p.parse_args()
    if args.version:
        print("replicator fake")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.command == "agent":
        while True:
            time.sleep(1)
    if args.command == "receiver":
        conf = tomllib.loads(args.config.read_text())
        agent = tomllib.loads(args.config.with_name("agent.toml").read_text())
        http, src = conf["http"], Path(agent["datasets"][0]["path"])
        dst = Path(conf["mirror_root"], agent["source_id"], agent["datasets"][0]["name"])
    else:
        http, src, dst = args.http, args.src, args.dst
    state = State()
    host, port = http.rsplit(":", 1)
    serve(state, host, int(port))
    copy_forever(state, src, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
