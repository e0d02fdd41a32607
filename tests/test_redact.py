"""An S3 endpoint given with a user and password (AWS_ENDPOINT_URL=http://user:pass@host) never
appears whole: not in a command's error line, not in the daemon's answers or its log.

Nothing listens at the endpoint (a port just found free): every request fails at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import fcsnap
from test_daemon import Daemon

from fcsnap.daemon.client import call_daemon
from fcsnap.errors import redact
from fcsnap.testing.s3server import free_ports

SECRET = "s3cr3t-pw"
WAIT = 60


@pytest.mark.parametrize(("text", "shown"), [
    ("http://user:pw@host:9/x", "http://***@host:9/x"),
    ("at https://u:p@ss@h/k and s3://k:v@b/p", "at https://***@h/k and s3://***@b/p"),
    ("http://host:9/no-user", "http://host:9/no-user"),
    ("mail me@example.org", "mail me@example.org"),
])
def test_redact_removes_userinfo(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.fixture
def endpoint_env() -> dict[str, str]:
    port = free_ports(1)[0]
    return {**os.environ, "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_ENDPOINT_URL": f"http://admin:{SECRET}@127.0.0.1:{port}"}


def test_command_errors_never_show_the_endpoints_password(endpoint_env, tmp_path: Path
                                                        ) -> None:
    """An unreachable endpoint and one of the wrong scheme: one line each, the userinfo
    replaced by ***."""
    result = fcsnap("ls", "--store", "s3://bucket", "--json", env=endpoint_env)
    assert result.returncode == 1 and SECRET not in result.stderr + result.stdout
    assert result.stderr.startswith("fcsnap: error: cannot reach S3 at http://***@127.0.0.1:")
    ftp = {**endpoint_env, "AWS_ENDPOINT_URL": f"ftp://admin:{SECRET}@host"}
    result = fcsnap("ls", "--store", "s3://bucket", env=ftp)
    assert result.returncode == 1 and SECRET not in result.stderr
    assert "'ftp://***@host' is not an http" in result.stderr


def test_daemon_answers_and_log_never_show_the_endpoints_password(
    endpoint_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in endpoint_env.items():
        monkeypatch.setenv(key, value)
    daemon = Daemon("s3://bucket", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    try:
        status, answer = call_daemon(daemon.api, "POST", "/restores", {
            "vm": "web", "socket": str(tmp_path / "s.sock")}, WAIT)
        assert status >= 400 and "http://***@127.0.0.1:" in answer["error"], answer
        assert SECRET not in answer["error"]
        code, lines = daemon.stop()
        assert code == 0 and lines and not any(SECRET in line for line in lines), lines
    finally:
        daemon.close()
