"""A seeded random workload of file-system changes on a source tree."""

from __future__ import annotations

import os
import random
from pathlib import Path

OPS = ("create", "overwrite", "append", "truncate", "rename", "delete", "symlink", "chmod",
       "utime", "mkdir", "rename_dir", "sparse")


class Workload:
    def __init__(self, root: Path, seed: int, *, max_size: int = 300_000) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.counter = 0

    def _files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink()]

    def _dirs(self) -> list[Path]:
        return [self.root] + [p for p in self.root.rglob("*") if p.is_dir()
                              and not p.is_symlink()]

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _data(self, n: int) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.randbytes(n)
        word = self.rng.choice([b"alpha ", b"beta gamma ", b"delta\n"])
        return (word * (n // len(word) + 1))[:n]

    def step(self) -> str:
        op = self.rng.choice(OPS)
        files, dirs = self._files(), self._dirs()
        rng = self.rng
        try:
            if op == "create" or (not files and op in ("overwrite", "append", "truncate",
                                                        "rename", "delete", "chmod", "utime")):
                (rng.choice(dirs) / self._name("f")).write_bytes(
                    self._data(rng.randrange(0, self.max_size)))
                return "create"
            if op == "overwrite":
                f = rng.choice(files)
                size = f.stat().st_size
                with open(f, "r+b") as fh:
                    off = rng.randrange(0, size + 1)
                    fh.seek(off)
                    fh.write(self._data(rng.randrange(1, 70_000)))
            elif op == "append":
                with open(rng.choice(files), "ab") as fh:
                    fh.write(self._data(rng.randrange(1, 100_000)))
            elif op == "truncate":
                f = rng.choice(files)
                size = f.stat().st_size
                os.truncate(f, rng.randrange(0, size * 2 + 10))
            elif op == "rename":
                f = rng.choice(files)
                f.rename(rng.choice(dirs) / self._name("r"))
            elif op == "delete":
                rng.choice(files).unlink()
            elif op == "symlink":
                target = rng.choice(["../nowhere", "/etc/passwd", "f1", "sub/x"])
                (rng.choice(dirs) / self._name("l")).symlink_to(target)
            elif op == "chmod":
                rng.choice(files).chmod(rng.choice([0o600, 0o644, 0o640, 0o755]))
            elif op == "utime":
                f = rng.choice(files)
                t = rng.randrange(1_500_000_000, 1_700_000_000) * 10**9 + rng.randrange(10**9)
                os.utime(f, ns=(t, t))
            elif op == "mkdir":
                d = rng.choice(dirs) / self._name("d")
                d.mkdir()
                if rng.random() < 0.5:
                    (d / "inside").write_bytes(self._data(1000))
            elif op == "rename_dir":
                candidates = [d for d in dirs if d != self.root]
                if candidates:
                    d = rng.choice(candidates)
                    dest_parent = rng.choice([p for p in dirs if not p.is_relative_to(d)])
                    d.rename(dest_parent / self._name("m"))
            elif op == "sparse":
                f = rng.choice(dirs) / self._name("s")
                with open(f, "wb") as fh:
                    fh.truncate(rng.randrange(1, 3) * 1_000_000)
                    fh.seek(rng.randrange(0, 500_000))
                    fh.write(self._data(5000))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
                OSError):
            return "skipped"
        return op
