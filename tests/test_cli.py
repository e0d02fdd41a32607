"""The command line's last line of defence: whatever goes wrong, one line and exit 1."""

from __future__ import annotations

import sys

import pytest

from fcsnap import api, cli


def fail_with_a_bug(monkeypatch: pytest.MonkeyPatch, tmp_path, debug: bool) -> int:
    """Run `fcsnap inspect` with a KeyError planted where the header is loaded."""
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("injected")

    monkeypatch.setattr(api, "inspect", broken)
    monkeypatch.setattr(cli, "_state", {"debug": debug})
    header = tmp_path / "memfile.header"
    header.write_bytes(b"x")
    monkeypatch.setattr(sys, "argv", ["fcsnap", "inspect", str(header)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return int(exit_info.value.code or 0)


def test_a_bug_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path) -> None:
    """An exception fcsnap did not foresee still gives one line, not a traceback."""
    assert fail_with_a_bug(monkeypatch, tmp_path, debug=False) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fcsnap: error: internal error (KeyError")


def test_debug_shows_the_traceback(monkeypatch, capsys, tmp_path) -> None:
    assert fail_with_a_bug(monkeypatch, tmp_path, debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("fcsnap: error: internal")
