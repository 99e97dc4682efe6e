"""``vram-orchestrator serve --ray``: what it refuses before it connects anywhere."""

from __future__ import annotations

import pytest

from orchestrator.cli import main


def test_serve_ray_needs_the_machines_config_path(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray", reason="serve --ray needs Ray: pip install -e '.[ray]'")
    assert main(["serve", "--ray", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "--ray needs --config" in err


def test_serve_ray_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--ray ADDRESS" in capsys.readouterr().out
