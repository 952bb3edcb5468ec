from __future__ import annotations

import pytest

from replicator.agent.excludes import Excludes

CASES: list[tuple[list[str], str, bool, bool]] = [
    # patterns, relpath, is_dir, excluded
    # basename patterns match at any depth
    (["*.swp"], "a.swp", False, True),
    (["*.swp"], "x/y/.a.swp", False, True),
    (["*.swp"], "a.swpx", False, False),
    (["*.swp"], "a.swp/inner", False, True),  # a directory named a.swp: its contents too
    (["tmp"], "tmp", True, True),
    (["tmp"], "tmp/a/b", False, True),
    (["tmp"], "a/tmp", True, True),
    (["tmp"], "a/tmp/x", False, True),
    (["tmp"], "tmpx", False, False),
    (["tmp"], "atmp/x", False, False),
    # anchored patterns
    (["tmp/**"], "tmp", True, False),  # decided: contents only, the dir stays
    (["tmp/**"], "tmp/a", False, True),
    (["tmp/**"], "tmp/a/b/c", False, True),
    (["tmp/**"], "a/tmp/b", False, False),
    (["/tmp"], "tmp", True, True),
    (["/tmp"], "tmp/x", False, True),
    (["/tmp"], "a/tmp", True, False),
    (["build/out"], "build/out", False, True),
    (["build/out"], "x/build/out", False, False),
    (["a/*/c"], "a/b/c", False, True),
    (["a/*/c"], "a/b/x/c", False, False),  # * does not cross '/'
    (["a/**/c"], "a/c", False, True),
    (["a/**/c"], "a/b/x/c", False, True),
    (["a/**/c"], "b/a/c", False, False),
    (["**/node_modules"], "node_modules", True, True),
    (["**/node_modules"], "x/y/node_modules/z", False, True),
    (["**/*.o"], "src/deep/m.o", False, True),
    (["logs/**/*.log"], "logs/a.log", False, True),
    (["logs/**/*.log"], "logs/d/a.log", False, True),
    (["logs/**/*.log"], "other/a.log", False, False),
    (["d/a**b"], "d/a/x/b", False, True),  # ** elsewhere crosses components
    (["a**b"], "a/x/b", False, False),  # ...but without '/' only the basename is seen
    # ? and classes
    (["?.txt"], "a.txt", False, True),
    (["?.txt"], "ab.txt", False, False),
    (["[abc].txt"], "b.txt", False, True),
    (["[abc].txt"], "d.txt", False, False),
    (["[!abc].txt"], "d.txt", False, True),
    (["[!abc].txt"], "a.txt", False, False),
    (["x[0-9]"], "x5", False, True),
    (["d/x[/]y"], "d/x/y", False, False),  # a class never matches '/'
    (["[!a]"], "/", False, False),
    (["[unclosed"], "[unclosed", False, True),  # literal '[' when unclosed
    # trailing '/': directories only
    (["cache/"], "cache", True, True),
    (["cache/"], "cache", False, False),
    (["cache/"], "a/cache/f", False, True),  # its ancestor is a directory
    (["/out/"], "out", True, True),
    (["/out/"], "x/out", True, False),
    # escapes and regex metacharacters are literal
    (["\\*.txt"], "*.txt", False, True),
    (["\\*.txt"], "a.txt", False, False),
    (["a+b(1).txt"], "a+b(1).txt", False, True),
    (["a.b"], "axb", False, False),
    # several patterns; no patterns
    (["*.swp", "tmp/**", "cache/"], "tmp/x.swp", False, True),
    (["*.swp", "tmp/**", "cache/"], "src/main.py", False, False),
    ([], "anything", False, False),
    (["*"], "", True, False),  # the root itself is never excluded
    # names that are not UTF-8 come through surrogateescape and still match
    (["*.swp"], "d/\udcff.swp", False, True),
]


@pytest.mark.parametrize(("patterns", "relpath", "is_dir", "excluded"), CASES)
def test_match(patterns: list[str], relpath: str, is_dir: bool, excluded: bool) -> None:
    assert Excludes(patterns).match(relpath, is_dir) is excluded


@pytest.mark.parametrize(
    ("patterns", "relpath", "is_dir", "expected"),
    [
        (["tmp"], "tmp/a", False, False),  # the ancestor is not looked at
        (["tmp"], "tmp", True, True),
        (["tmp/**"], "tmp/a", False, True),
        (["cache/"], "cache", False, False),
    ],
)
def test_match_entry_ignores_ancestors(
    patterns: list[str], relpath: str, is_dir: bool, expected: bool
) -> None:
    assert Excludes(patterns).match_entry(relpath, is_dir) is expected


@pytest.mark.parametrize("bad", ["", "   ", "!keep.txt", "/", "//"])
def test_invalid_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Excludes([bad])


def test_a_single_string_is_refused() -> None:
    with pytest.raises(TypeError):
        Excludes("*.swp")  # type: ignore[arg-type]


def test_bool_says_whether_anything_can_be_excluded() -> None:
    assert not Excludes([])
    assert Excludes(["*.swp"])
