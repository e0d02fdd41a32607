"""An S3 endpoint given with a user and password (AWS_ENDPOINT_URL=http://user:pass@host) never
appears whole: not in a command's error line, not in the daemon's.

Nothing listens at the endpoint (a port just found free): every request fails at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import fcsnap

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


def test_the_daemons_refusal_never_shows_the_endpoints_password(
    endpoint_env, tmp_path: Path
) -> None:
    """The daemon reads its store's marker before it listens: an unreachable endpoint is its
    one error line, the userinfo replaced by ***."""
    result = fcsnap("serve", "--store", "s3://bucket", "--api", tmp_path / "api.sock",
                    "--cache-dir", tmp_path / "cache", env=endpoint_env)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("fcsnap: error: cannot reach S3 at http://***@127.0.0.1:"), lines
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "api.sock").exists()
