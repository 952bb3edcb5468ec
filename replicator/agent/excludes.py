"""Exclude globs of a directory dataset, relative to the dataset root.

The rules are gitignore-like, kept small:

- `*` matches within one path component, `?` one character of a component, `[...]` a class
  (`[!...]` negates); `**` matches across components: `**/x` is `x` at any depth, `a/**` is
  everything inside `a` (not `a` itself), `a/**/b` is `b` anywhere below `a`.
- A pattern without a `/` is matched against the basename at any depth (`*.swp`, `tmp`).
  A pattern with a `/` is anchored at the dataset root (`tmp/**`, `build/out`); a leading
  `/` only anchors (`/tmp` is the root's `tmp`, not `a/tmp`).
- A trailing `/` restricts the pattern to directories (`cache/`).
- A path whose ancestor directory is excluded is excluded: `tmp` excludes the directory and
  everything below it, while `tmp/**` excludes what is inside but keeps the (then empty)
  directory itself.
- `\\` escapes the next character. Negation (`!pattern`) is not supported and refused, so
  that a gitignore habit does not silently mean "exclude files named !pattern".

All patterns are compiled into four alternations (basename or path, any entry or
directories only), so a match costs a few regex calls whatever the number of patterns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NEVER = re.compile(r"(?!)")


def _translate(pattern: str) -> str:
    """One glob (without leading or trailing '/') -> a regex body matched with fullmatch."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            if j - i == 1:
                out.append("[^/]*")
            else:
                at_start = i == 0 or pattern[i - 1] == "/"
                if at_start and j < n and pattern[j] == "/":
                    # `**/`: zero or more whole directories
                    out.append("(?:.*/)?")
                    j += 1
                elif at_start and j == n and i > 0:
                    # `a/**`: something inside a, not a itself
                    out.append(".+")
                else:
                    out.append(".*")
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                # no closing bracket: a literal '[' as fnmatch does
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            body = body.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
            # a class never matches the separator, as in gitignore
            out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def _compile(bodies: list[str]) -> re.Pattern[str]:
    if not bodies:
        return _NEVER
    return re.compile("|".join(f"(?:{b})" for b in bodies), re.DOTALL)


class Excludes:
    """A compiled set of exclude globs; see the module docstring for the rules."""

    def __init__(self, patterns: Sequence[str]) -> None:
        if isinstance(patterns, str):
            raise TypeError("patterns must be a sequence of strings, not one string")
        self.patterns: tuple[str, ...] = tuple(patterns)
        base_any: list[str] = []
        base_dir: list[str] = []
        path_any: list[str] = []
        path_dir: list[str] = []
        for raw in self.patterns:
            pattern = raw
            if not pattern or pattern.strip() == "":
                raise ValueError(f"empty exclude pattern: {raw!r}")
            if pattern.startswith("!"):
                raise ValueError(f"negated exclude patterns are not supported: {raw!r}")
            dir_only = pattern.endswith("/") and not pattern.endswith("\\/")
            pattern = pattern.rstrip("/") if dir_only else pattern
            anchored = "/" in pattern
            pattern = pattern.lstrip("/")
            if not pattern:
                raise ValueError(f"exclude pattern matches the dataset root: {raw!r}")
            body = _translate(pattern)
            if anchored:
                (path_dir if dir_only else path_any).append(body)
            else:
                (base_dir if dir_only else base_any).append(body)
        self._base_any = _compile(base_any)
        self._base_dir = _compile(base_dir)
        self._path_any = _compile(path_any)
        self._path_dir = _compile(path_dir)
        self._empty = not self.patterns

    def __bool__(self) -> bool:
        return not self._empty

    def __repr__(self) -> str:
        return f"Excludes({list(self.patterns)!r})"

    def match_entry(self, relpath: str, is_dir: bool = False) -> bool:
        """Whether this entry itself matches a pattern, not looking at its ancestors.

        For walkers that never descend into an excluded directory (the scanner): there the
        ancestors are known not to be excluded and checking them again would cost O(depth).
        """
        if self._empty:
            return False
        name = relpath.rpartition("/")[2]
        if self._base_any.fullmatch(name) or self._path_any.fullmatch(relpath):
            return True
        return is_dir and bool(
            self._base_dir.fullmatch(name) or self._path_dir.fullmatch(relpath)
        )

    def match(self, relpath: str, is_dir: bool = False) -> bool:
        """Whether `relpath` ('/'-separated, relative to the root) or an ancestor is excluded."""
        if self._empty or not relpath:
            return False
        if self.match_entry(relpath, is_dir):
            return True
        end = relpath.find("/")
        while end != -1:
            if self.match_entry(relpath[:end], True):
                return True
            end = relpath.find("/", end + 1)
        return False
