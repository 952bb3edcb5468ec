"""The daemons' process set-up: malloc keeps message-sized buffers for reuse, the cyclic
garbage collector runs less often."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: how many bytes glibc holds in mmapped blocks while a 4 MiB buffer
# is alive (mallinfo2, glibc >= 2.33). Such blocks are unmapped when freed, so the next
# buffer costs fresh pages again.
_PROBE = """
import ctypes, sys
from replicator.daemon import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert tune_malloc()
buffer = bytearray(4 << 20)
print(libc.mallinfo2().hblkhd)
"""


def _mmapped_bytes(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_*_ variables from the caller
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout)


def test_tuned_malloc_serves_message_sized_buffers_from_the_heap() -> None:
    try:
        untuned = _mmapped_bytes("default")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no glibc mallinfo2 here: {e.stderr.strip().splitlines()[-1]}")
    # glibc's default: 4 MiB is above its initial mmap threshold (128 KiB), so it is mmapped
    assert untuned >= 4 << 20
    assert _mmapped_bytes("tuned") < 4 << 20


def test_no_asyncio_wait_for_in_the_package() -> None:
    """In Python 3.11 asyncio.wait_for loses a cancellation that arrives as the awaited
    thing completes, and a daemon then ignores SIGTERM/SIGINT for good (it happened twice:
    the agent's reconcile loop, then its wait for the welcome). asyncio.timeout does not."""
    import re
    from pathlib import Path

    import replicator

    root = Path(replicator.__file__).parent
    offenders = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"asyncio\.wait_for\(", line)]
    assert offenders == []


_GC_PROBE = """
import gc
from replicator.daemon import GC_THRESHOLDS, tune_gc

tune_gc()
assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()
print(gc.get_freeze_count())
"""


def test_tuned_gc_leaves_start_up_objects_alone_and_runs_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", _GC_PROBE], capture_output=True, text=True,
                         check=True)
    # everything the imports made is frozen: thousands of objects no collection walks
    assert int(out.stdout) > 10_000
