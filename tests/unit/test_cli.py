"""The command line: ``check-config`` and ``run`` report configuration problems as
``file:line: key: problem`` lines with exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from switch.cli import main

REPO = Path(__file__).resolve().parents[2]

BAD_CONFIG = """\
switch:
  domains: []
accounts:
  - id: acme
    devices:
      - extension: "1000"
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "switch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", ["config/switch.yaml", "config/example-full.yaml"])
def test_check_config_accepts_shipped_configurations(name: str) -> None:
    result = run_cli("check-config", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{name}: ok\n"
    assert "Traceback" not in result.stderr


def test_check_config_reports_every_problem_with_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_CONFIG)
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{config}:2: switch.domains: must have at least 1 item",
        f"{config}:6: accounts[0].devices[0].password:"
        " either password, ha1_md5 or ha1_sha256 is required",
    ]
    assert "Traceback" not in result.stderr


def test_check_config_yaml_syntax_error(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("listen:\n  - {transport: udp, host: 127.0.0.1\nauth: {}\n")
    result = run_cli("check-config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{config}:3: (yaml): ")
    assert "Traceback" not in result.stderr


def test_check_config_missing_file() -> None:
    result = run_cli("check-config", "no/such/file.yaml")
    assert result.returncode == 2
    assert result.stderr == "no/such/file.yaml:1: (file): cannot read: No such file or directory\n"
    assert "Traceback" not in result.stderr


def test_run_with_bad_config_exits_2_before_starting(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_CONFIG)
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:2: switch.domains: must have at least 1 item" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr


def test_main_in_process_returns_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("switch: {node_id: test}\n")
    assert main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("registrar: {min_expires: -1}\n")
    assert main(["check-config", str(bad)]) == 2
    assert capsys.readouterr().err == f"{bad}:1: registrar.min_expires: must be at least 1\n"


def test_unknown_command_is_a_usage_error() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr
