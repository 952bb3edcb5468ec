"""`replicator allow-empty (--config FILE | --state-dir DIR) --dataset NAME`.

The operator's confirmation that a dataset's root was emptied on purpose: the agent's
safety guard then ships the deletions once instead of holding the dataset in `error`
(see agent/guard.py). It only leaves a file in the agent's state directory, so it
works whether the agent runs or not; a running agent takes it at its next guard check.
"""

from __future__ import annotations

import argparse
import os
import stat
import time
from pathlib import Path

from replicator.agent import guard
from replicator.config import NAME_RE, load_agent
from replicator.errors import ReplicatorError, UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "allow-empty", help="let the agent ship the emptying of a dataset's root, once",
        description="Confirm that a dataset's root was emptied on purpose: the agent ships "
        "the deletions once (within %.0f minutes) instead of guarding the mirror."
        % (guard.ALLOW_EMPTY_TTL / 60))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, metavar="FILE", help="the agent's configuration")
    where.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="the agent's state_dir (for `mirror`: its --state-dir/agent)")
    p.add_argument("--dataset", required=True, metavar="NAME")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    name: str = args.dataset
    if not NAME_RE.match(name) or name in (".", ".."):
        raise UsageError(f"--dataset {name!r} is not a dataset name")
    if args.config is not None:
        config = load_agent(args.config)
        datasets = {d.name: d for d in config.datasets}
        if name not in datasets:
            raise UsageError(f"{args.config}: no dataset {name!r} (configured: "
                             f"{', '.join(sorted(datasets)) or 'none'})")
        if datasets[name].type != "directory":
            raise UsageError(f"{args.config}: dataset {name!r} is a {datasets[name].type} "
                             "dataset; only directory datasets have the empty-root guard")
        _check_root(datasets[name].path)
        state_dir = config.state_dir
    else:
        state_dir = args.state_dir
    directory = guard.dataset_dir(state_dir, name)
    if not directory.is_dir():
        # never created here: the agent (perhaps another user) makes it with its index
        raise UsageError(f"no dataset {name!r} in {state_dir}: the agent has never run it, "
                         "so it has no mirror to guard")
    try:
        c = guard.grant(directory, name)
    except OSError as e:
        raise ReplicatorError(f"cannot write the confirmation in {directory}: "
                              f"{e.strerror or e}") from None
    until = time.strftime("%H:%M:%S", time.localtime(c.granted_at + guard.ALLOW_EMPTY_TTL))
    print(f"dataset {name}: the agent will ship the emptying of its root once, if it comes "
          f"before {until}")
    return 0


def _check_root(root: Path) -> None:
    """Refuses at once what the agent would refuse: a root that looks unmounted."""
    why = None
    try:
        st = os.stat(root)
        if not stat.S_ISDIR(st.st_mode):
            why = "is not a directory"
        else:
            with os.scandir(root):
                pass
    except OSError as e:
        why = f"is gone ({e.strerror})" if isinstance(e, FileNotFoundError) \
            else f"is unreadable ({e.strerror})"
    if why is not None:
        raise ReplicatorError(f"dataset root {root} {why}: that is an unmount, not an "
                              "emptying; allow-empty refused")
