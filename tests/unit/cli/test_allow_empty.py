"""`replicator allow-empty`: writes the confirmation where the agent looks for it, or exits 2
with one line on stderr."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from replicator.agent import guard
from replicator.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "replicator", "allow-empty", *args],
                          capture_output=True, text=True, timeout=60)


def run_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command in this process (faster): exit code, stdout, stderr."""
    try:
        code = main(["allow-empty", *args])
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    """An agent configuration whose dataset `docs` has run (its state dir exists)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "state" / "datasets" / "docs").mkdir(parents=True)
    conf = tmp_path / "agent.toml"
    conf.write_text(f'source_id = "app1"\nreceiver = "127.0.0.1:1"\n'
                    f'state_dir = "{tmp_path / "state"}"\n'
                    f'[[datasets]]\nname = "docs"\ntype = "directory"\n'
                    f'path = "{tmp_path / "src"}"\n'
                    f'[[datasets]]\nname = "gone"\ntype = "directory"\n'
                    f'path = "{tmp_path / "nowhere"}"\n')
    return conf


@pytest.mark.parametrize("how", ["config", "state-dir"])
def test_writes_a_fresh_confirmation(agent: Path, how: str) -> None:
    where = str(agent) if how == "config" else str(agent.parent / "state")
    before = time.time()
    r = run(f"--{how}", where, "--dataset", "docs")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and not r.stderr
    c = guard.read(agent.parent / "state" / "datasets" / "docs")
    assert c is not None and c.dataset == "docs" and before <= c.granted_at <= time.time()


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "nope"], "no dataset 'nope' (configured: docs, gone)"),
    (["--dataset", "gone"], "is gone"),                      # looks unmounted: refused
    (["--dataset", "../docs"], "not a dataset name"),
    (["--dataset", ".."], "not a dataset name"),
    (["--state-dir", "STATE", "--dataset", "nope"], "no dataset 'nope' in"),
    (["--config", "/nonexistent.toml", "--dataset", "docs"], "nonexistent.toml"),
    (["--dataset"], "expected one argument"),
    ([], "required"),
])
def test_refusals_exit_2_with_one_line(agent: Path, args: list[str], message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    if "--state-dir" not in args and "--config" not in args and args:
        args = ["--config", str(agent), *args]
    args = [str(agent.parent / "state") if a == "STATE" else a for a in args]
    code, out, err = run_here(capsys, *args)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not list((agent.parent / "state").rglob(guard.CONFIRMATION_FILE))


def test_a_dataset_the_agent_never_ran_is_refused(agent: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (agent.parent / "state" / "datasets" / "docs").rmdir()
    code, _, err = run_here(capsys, "--config", str(agent), "--dataset", "docs")
    assert code == 2 and "never run it" in err, err
    assert not (agent.parent / "state" / "datasets" / "docs").exists(), "nothing created"
