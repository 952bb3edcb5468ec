"""Relative paths from the wire, checked before the receiver touches the file system.

A path names an entry below a dataset root as '/'-separated components. Everything the
agent sends is untrusted, so a path is accepted only in one strict, canonical spelling:
relative, no empty, '.' or '..' components, no trailing '/', no NUL, and within the
kernel's limits on names and paths. There is no normalisation: "a//b" is refused rather
than read as "a/b", so one path has exactly one spelling on the wire and in the manifest.

File names that are not valid UTF-8 travel as str with surrogateescape (the
os.fsencode/os.fsdecode round trip); their length is measured in the bytes they stand for.
Lone surrogates that do not stand for a byte cannot be written to the file system and are
refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from replicator.errors import PathRefused

MAX_PATH_BYTES = 4096   # PATH_MAX on Linux, counted without the terminating NUL
MAX_NAME_BYTES = 255    # NAME_MAX on Linux
SEPARATOR = "/"
# How much of a refused path a message shows: enough to find it, never a flood.
_SHOWN_CHARS = 100


def quote_path(path: str) -> str:
    """`path` for a one-line message: repr (escapes newlines and controls), truncated."""
    if len(path) > _SHOWN_CHARS:
        return repr(path[:_SHOWN_CHARS]) + f"...({len(path)} chars)"
    return repr(path)


def encode_name(name: str) -> bytes:
    """The bytes a wire str stands for (UTF-8, surrogateescape). Raises UnicodeEncodeError."""
    return name.encode("utf-8", "surrogateescape")


def decode_name(raw: bytes) -> str:
    """The wire str for file-system bytes (UTF-8, surrogateescape): inverse of encode_name."""
    return raw.decode("utf-8", "surrogateescape")


def split_relpath(path: str) -> tuple[str, ...]:
    """The components of a relative wire path; PathRefused if it is not safe and canonical."""
    if not path:
        raise PathRefused("path refused: empty path")
    if "\0" in path:
        raise _refused(path, "contains NUL")
    try:
        size = len(encode_name(path))
    except UnicodeEncodeError:
        raise _refused(path, "holds a lone surrogate that stands for no byte") from None
    if size > MAX_PATH_BYTES:
        raise _refused(path, f"is {size} bytes, over {MAX_PATH_BYTES}")
    if path.startswith(SEPARATOR):
        raise _refused(path, "is absolute")
    if path.endswith(SEPARATOR):
        raise _refused(path, "ends with '/'")
    parts = tuple(path.split(SEPARATOR))
    for part in parts:
        if part in ("", ".", ".."):
            raise _refused(path, f"has a component {part!r}")
        # no component is longer than the whole path: most paths need no count of each
        if size > MAX_NAME_BYTES and (name_size := len(encode_name(part))) > MAX_NAME_BYTES:
            raise _refused(path, f"has a component of {name_size} bytes, over {MAX_NAME_BYTES}")
    return parts


def _refused(path: str, why: str) -> PathRefused:
    """The error for `path`, quoted only now: quoting every path checked cost more than
    the checks."""
    return PathRefused(f"path refused: {quote_path(path)} {why}")


def join_relpath(parts: Iterable[str]) -> str:
    """The wire path for `parts`; PathRefused unless split_relpath gives `parts` back.

    Checking the round trip also refuses a part that contains '/', which would otherwise
    silently become two components.
    """
    parts = tuple(parts)
    path = SEPARATOR.join(parts)
    if split_relpath(path) != parts:
        raise PathRefused(f"path refused: component of {quote_path(path)} contains '/'")
    return path


def is_within(path: str, prefix: str) -> bool:
    """True if `path` is `prefix` or below it, by whole components ("ab" is not within "a").

    An empty prefix is the dataset root, which holds every path.
    """
    if not prefix:
        return True
    return path == prefix or path.startswith(prefix + SEPARATOR)
