"""TLS between agent and receiver, with client certificates that must name the source."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import (
    Daemon,
    agent_config,
    free_port,
    get_json,
    receiver_config,
    wait_converged,
    wait_for,
)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A CA, a server certificate for localhost, and client certificates app1 and intruder."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, ext in [("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                      ("app1", "subjectAltName=DNS:app1"),
                      ("intruder", "subjectAltName=DNS:intruder")]:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                f"{name}.ext", cwd=d)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("cert", ["app1", "intruder"])
def test_client_certificate_must_name_the_source(tmp_path: Path, cert: str) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.txt").write_text("only for app1")
    port, rhttp, ahttp = free_port(), free_port(), free_port()
    rconf = receiver_config(
        tmp_path / "r.toml", listen_port=port, state=tmp_path / "rs", mirror_root=tmp_path / "m",
        http_port=rhttp,
        extra=f'\n[tls]\ncert = "{pki}/server.pem"\nkey = "{pki}/server.key"\n'
              f'client_ca = "{pki}/ca.pem"\n')
    aconf = agent_config(
        tmp_path / "a.toml", receiver_port=port, state=tmp_path / "as", source=src,
        http_port=ahttp,
        extra=f'\n[tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/{cert}.pem"\n'
              f'key = "{pki}/{cert}.key"\n')
    aconf.write_text(aconf.read_text().replace("127.0.0.1:", "localhost:", 1))
    receiver = Daemon(["receiver", "--config", str(rconf)], tmp_path / "r.log").start()
    agent = Daemon(["agent", "--config", str(aconf)], tmp_path / "a.log").start()
    try:
        if cert == "app1":
            wait_converged(src, tmp_path / "m" / "app1" / "docs")
        else:
            wait_for(lambda: "PERMISSION_DENIED" in (
                get_json(f"http://127.0.0.1:{ahttp}/status")["datasets"][0].get("error") or ""),
                30, message="the agent to report the refusal")
            assert not (tmp_path / "m" / "app1").exists()
            assert "certificate does not match" in receiver.log()
        assert agent.stop() == 0
        assert receiver.stop() == 0
    finally:
        agent.kill()
        receiver.kill()
