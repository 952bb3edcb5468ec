"""replicator side by side with rsync: `make bench` (or `python benchmarks/run.py --help`).

Runs, in one go and on the same data, the initial sync of one big file and of many small
files, the resync after a 1% scattered change, the latency of single small changes, and a
bulk copy into a live tree; prints medians over the repetitions, the ratio replicator/rsync
and the project's targets.
"""

from __future__ import annotations

import argparse
import compileall
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.mirror import REPLICATOR, REPO_ROOT  # noqa: E402
from benchmarks.report import MIB, as_json, render  # noqa: E402
from benchmarks.rsyncd import RSYNC, RsyncDaemon  # noqa: E402
from benchmarks.scenarios import BENCHMARKS, Bench, Settings  # noqa: E402
from benchmarks.util import drop_caches  # noqa: E402

log = logging.getLogger("bench")

DEFAULT_REPS = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help=f"repetitions; the table shows medians (default {DEFAULT_REPS})")
    p.add_argument("--quick", action="store_true", help="one repetition")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the temporary data directory (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    p.add_argument("--drop-caches", choices=["auto", "no"], default="auto",
                   help="drop the page cache before each timed run (auto: when permitted)")
    p.add_argument("--size-mib", type=int, default=1024, help="big file size (default 1024)")
    p.add_argument("--files", type=int, default=20_000, help="small files (default 20000)")
    p.add_argument("--latency-writes", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-rsync-fsync", dest="rsync_fsync", action="store_false",
                   help="skip the initial syncs' extra rsync --fsync runs")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="skip the initial syncs' extra agent + receiver (two-process) runs")
    p.add_argument("--replicator", default=" ".join(REPLICATOR),
                   help="command that runs replicator (default: this python -m replicator)")
    p.add_argument("--rsync", default=RSYNC)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
    return args


def describe(args: argparse.Namespace, settings: Settings) -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            return "?"
        return out.splitlines()[0] if out else "?"

    cache = ("page cache dropped before every timed run (sync; echo 3 > drop_caches)"
             if settings.drop_caches else "page cache kept: warm runs")
    return "\n".join([
        f"replicator benchmarks  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"{platform.node()}  {os.cpu_count()} cpus  {platform.release()}",
        f"{first_line([*args.replicator.split(), '--version'])}; "
        f"{first_line([args.rsync, '--version'])}",
        f"medians of {settings.reps} repetition(s); {cache}",
    ])


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    if not shutil.which(args.rsync):
        print(f"benchmarks: rsync not found at {args.rsync} (apt-get install rsync)",
              file=sys.stderr)
        return 2
    names = args.only or list(BENCHMARKS)
    # an installed package has its bytecode compiled (pip does it): so must the checkout
    # the benchmark runs, else every timed start compiles it anew, as it does under
    # PYTHONDONTWRITEBYTECODE
    compileall.compile_dir(REPO_ROOT / "replicator", quiet=1)
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="replicator-bench-", dir=args.workdir))
    except OSError as e:
        print(f"benchmarks: cannot make a data directory in {args.workdir or 'the temp dir'}:"
              f" {e.strerror or e}", file=sys.stderr)
        return 2
    settings = Settings(workdir=work, reps=args.reps, big_size=args.size_mib * MIB,
                        small_files=args.files, latency_writes=args.latency_writes,
                        seed=args.seed, replicator=args.replicator.split(),
                        rsync_fsync=args.rsync_fsync, split=args.split,
                        drop_caches=args.drop_caches == "auto" and drop_caches())
    rsyncd = RsyncDaemon(work / "rsync-module", work / "rsyncd", args.rsync)
    bench = Bench(settings, rsyncd)
    t0 = time.perf_counter()
    try:
        with rsyncd:
            log.info("rsync daemon up port=%d workdir=%s", rsyncd.port, work)
            for name in names:
                log.info("benchmark start name=%s", name)
                bench.current = name
                BENCHMARKS[name](bench)
    finally:
        bench.empty_trash()
        if args.keep:
            log.info("data kept workdir=%s", work)
        else:
            t1 = time.perf_counter()
            shutil.rmtree(work, ignore_errors=True)
            log.info("data removed workdir=%s seconds=%.1f", work, time.perf_counter() - t1)

    print()
    print(describe(args, settings))
    print()
    print(render(bench.rows))
    for note in bench.notes:
        print(f"note: {note}")
    for failure in bench.failures:
        print(f"VERIFICATION FAILED: {failure}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": as_json(bench.rows), "notes": bench.notes,
                                         "failures": bench.failures}, indent=2))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: children stopped, data removed
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
