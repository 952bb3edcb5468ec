"""Path safety: hostile wire paths are refused, odd but valid names pass unchanged."""

from __future__ import annotations

import os

import pytest

from replicator.core.paths import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    is_within,
    join_relpath,
    quote_path,
    split_relpath,
)
from replicator.errors import PathRefused

NON_UTF8 = os.fsdecode(b"\xff")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "empty"),
        ("/", "absolute"),
        ("/etc/passwd", "absolute"),
        ("..", "'..'"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a/./b", "'.'"),
        (".", "'.'"),
        ("a//b", "''"),
        ("a/", "ends with '/'"),
        ("x\0y", "NUL"),
        ("\0", "NUL"),
        ("a" * (MAX_NAME_BYTES + 1), "256 bytes"),
        ("é" * 128, "256 bytes"),  # 128 chars, 256 bytes: counted in bytes
        ("d/" + "a" * (MAX_NAME_BYTES + 1) + "/e", "256 bytes"),  # in the middle
        ("/".join(["d" * 200] * 25), "bytes, over 4096"),  # 5024 bytes, names all fine
        ("a\ud800b", "lone surrogate"),  # not an escaped byte: cannot reach the fs
        ("a\udc2fb", "lone surrogate"),  # would be '/' if escapes below 0x80 were allowed
    ],
)
def test_hostile_paths_are_refused(path: str, why: str) -> None:
    with pytest.raises(PathRefused) as info:
        split_relpath(path)
    message = str(info.value)
    assert why in message
    assert "\n" not in message
    assert len(message) < 250


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("a", ("a",)),
        ("a/b/c", ("a", "b", "c")),
        ("with space/ x ", ("with space", " x ")),
        ("ünïcødé/日本語", ("ünïcødé", "日本語")),
        ("...", ("...",)),
        ("..a/a..", ("..a", "a..")),
        ("-rf", ("-rf",)),
        (".hidden/.x", (".hidden", ".x")),
        ("back\\slash", ("back\\slash",)),
        ("new\nline", ("new\nline",)),
        (NON_UTF8, (NON_UTF8,)),
        ("dir/" + os.fsdecode(b"caf\xe9"), ("dir", os.fsdecode(b"caf\xe9"))),
        ("a" * MAX_NAME_BYTES, ("a" * MAX_NAME_BYTES,)),
        ("/".join(["é" * 127] * 3), ("é" * 127,) * 3),  # long path, each name fine
    ],
)
def test_odd_but_valid_paths_are_accepted(path: str, parts: tuple[str, ...]) -> None:
    assert split_relpath(path) == parts
    assert join_relpath(parts) == path


def test_longest_path_is_accepted_one_more_byte_is_not() -> None:
    longest = "/".join(["n" * 255] * 15 + ["n" * 251, "nnnn"])
    assert len(longest.encode()) == MAX_PATH_BYTES
    assert split_relpath(longest)
    with pytest.raises(PathRefused):
        split_relpath(longest + "x")


def test_non_utf8_name_round_trips_to_the_same_bytes() -> None:
    (part,) = split_relpath(NON_UTF8)
    assert os.fsencode(part) == b"\xff"


@pytest.mark.parametrize("parts", [("a/b",), ("a", ""), ("..",), (), ("/abs",)])
def test_join_refuses_parts_that_do_not_round_trip(parts: tuple[str, ...]) -> None:
    with pytest.raises(PathRefused):
        join_relpath(parts)


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("a", "a", True),
        ("a/b", "a", True),
        ("a/b/c", "a/b", True),
        ("ab", "a", False),
        ("a", "a/b", False),
        ("b/a", "a", False),
        ("a.b", "a", False),
        ("anything", "", True),
    ],
)
def test_is_within(path: str, prefix: str, expected: bool) -> None:
    assert is_within(path, prefix) is expected


def test_refusal_message_truncates_long_paths() -> None:
    path = "x" * 10_000
    with pytest.raises(PathRefused) as info:
        split_relpath(path)
    assert len(str(info.value)) < 250
    assert "10000 chars" in quote_path(path)
