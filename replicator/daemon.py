"""Running a daemon: runtime objects from config, signals, systemd notify, locking.

`serve(main)` runs `main()` until it ends or until SIGTERM/SIGINT, which cancel it and
exit cleanly with 0. SIGHUP reloads nothing yet and says so. READY=1 goes to systemd (when
NOTIFY_SOCKET is set) once the daemon serves; STOPPING=1 when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from replicator.config import TlsConfig
from replicator.errors import ConfigError, ReplicatorError

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("systemd notify failed socket=%s error=%s", address, e.strerror)


# glibc mallopt(3) parameters and the values the daemons run with (see tune_malloc)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 128 << 20


def tune_malloc() -> bool:
    """Keeps freed message-sized buffers for reuse instead of giving them back to the kernel.

    glibc serves allocations from 128 KiB up (the limit grows only once such a block was
    freed) with mmap and returns them with munmap, so every ~1 MiB message, chunk or
    payload the daemons handle costs fresh zeroed pages and a page fault per 4 KiB: about
    a third of the system CPU time of a 1 GiB transfer. With blocks up to
    MALLOC_MMAP_THRESHOLD served from the heap, and up to MALLOC_TRIM_THRESHOLD of free
    heap kept, the same memory is reused. Memory stays bounded: the daemons' buffers are
    bounded (flow-control window, batch and group sizes); only what they peaked at is kept.
    The MALLOC_*_ environment variables, if set, win. Returns False where there is no
    glibc mallopt (musl, other platforms): nothing changes there.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1 and ok
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok = mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1 and ok
    return ok


# gc.set_threshold: a young collection after this many net container allocations instead
# of 700, and the older generations after 10 younger collections each instead of 10 and 7
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Makes the cyclic garbage collector run less often, and never over start-up objects.

    Per small file the daemons allocate dozens of short-lived objects (records, frames,
    entries), nearly none of them in cycles; with CPython's default thresholds a mirror of
    20,000 small files ran about 530 young and 4 full collections, the full ones walking
    every object of every imported module: 0.2 to 0.3 s of CPU. `gc.freeze()` moves what
    start-up made (modules, classes, configuration) out of the collector's sight, and with
    GC_THRESHOLDS the same mirror runs about 85 young collections (most of them before
    this is called) and no full one, in about 0.11 s. Cyclic garbage (an exception's
    traceback, say) still goes, a little later."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def raise_fd_limit() -> None:
    """Deep trees hold one fd per level while walked: take the hard limit of open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def lock_state_dir(state_dir: Path) -> int:
    """Creates state_dir and holds an exclusive lock on it for the life of the process."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"state_dir {state_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"state_dir {state_dir} is in use by another replicator "
                          "process") from None
    return fd


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"tls.{what}: {path}: {e.strerror}") from None


def channel_credentials(tls: TlsConfig | None) -> grpc.ChannelCredentials | None:
    if tls is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca, "ca"),
                                        private_key=_read(tls.key, "key"),
                                        certificate_chain=_read(tls.cert, "cert"))


def server_credentials(tls: TlsConfig | None) -> grpc.ServerCredentials | None:
    if tls is None:
        return None
    key, cert = _read(tls.key, "key"), _read(tls.cert, "cert")
    assert key is not None and cert is not None
    client_ca = _read(tls.client_ca, "client_ca")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def serve(main: Callable[[], Awaitable[None]]) -> int:
    """Runs main until it returns or a stop signal arrives; returns the exit code."""

    raise_fd_limit()
    tune_malloc()
    tune_gc()

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopping = False

        def stop(signame: str) -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                log.info("stopping signal=%s", signame)
                notify("STOPPING=1")
                task.cancel()

        loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, stop, "SIGINT")
        loop.add_signal_handler(
            signal.SIGHUP, lambda: log.info("SIGHUP: nothing can be reloaded safely yet; "
                                            "restart to apply configuration changes"))
        try:
            await main()
        except asyncio.CancelledError:
            if not stopping:
                raise
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    try:
        asyncio.run(runner())
    except BaseExceptionGroup as group:  # a TaskGroup's failure: report the cause
        cause = _first_error(group)
        if cause is not None:
            raise cause from None
        raise
    return 0


def _first_error(group: BaseExceptionGroup) -> ReplicatorError | None:  # type: ignore[type-arg]
    for e in group.exceptions:
        if isinstance(e, ReplicatorError):
            return e
        if isinstance(e, BaseExceptionGroup):
            found = _first_error(e)
            if found is not None:
                return found
    return None
