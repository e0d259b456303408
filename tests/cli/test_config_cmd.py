"""``dqr-xnat config check``: exit 0 when valid, 2 with every problem printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dqr_xnat.cli.config_cmd import check_config
from dqr_xnat.cli.main import main
from dqr_xnat.config import load_config


def closed_loopback_url() -> str:
    """An XNAT URL nothing listens on: ``config check`` tries to log in, and must stay on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{sock.getsockname()[1]}"


def write_config(tmp_path: Path, receiver: dict[str, str] | None = None, **xnat: str) -> Path:
    data = {
        "xnat": {"url": closed_loopback_url(), "user": "svc", **xnat},
        "receiver": receiver or {},
        "pacs": {"hospital": {"ae_title": "PACS1", "host": "127.0.0.1", "port": 104}},
        "projects": {"NEURO01": {"pacs": ["hospital"]}},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "dqr.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_valid_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DQR_CHECK_PW", "Zq9-secret-value")
    path = write_config(tmp_path, password_env="DQR_CHECK_PW")
    assert main(["--config", str(path), "config", "check"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: valid; 1 PACS (hospital); 1 project(s) (NEURO01)" in out
    assert "Zq9-secret-value" not in out


def test_every_problem_printed_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("xnat: {url: ftp://x}\npacs: {p: {host: h, port: 104}}\n"
                    "projects: {ABC: {pacs: [pacs2]}}\nstate_dir: /s\n", encoding="utf-8")
    assert main(["config", "check", str(path)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}: 3 problem(s)",
        "  xnat.url: must start with http:// or https://, not 'ftp://x'",
        "  pacs.p.ae_title: is required",
        "  projects.ABC.pacs[0]: unknown PACS 'pacs2'",
    ]


def test_environment_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DQR_CHECK_PW", raising=False)
    config = load_config(write_config(tmp_path, password_env="DQR_CHECK_PW", ca_bundle=str(tmp_path / "ca.pem")))
    (tmp_path / "state").mkdir(mode=0o755)
    os.chmod(tmp_path / "state", 0o755)
    assert check_config(config) == [
        "xnat.password_env: environment variable DQR_CHECK_PW is not set",
        f"state_dir: {tmp_path / 'state'} is accessible to other users and will hold patient data; "
        f"run: chmod 700 {tmp_path / 'state'}",
        f"xnat.ca_bundle: cannot read {tmp_path / 'ca.pem'}",
    ]


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pw\n", encoding="utf-8")
    os.chmod(secret, 0o644)
    config = load_config(write_config(tmp_path, password_file=str(secret)))
    assert check_config(config) == [
        f"xnat.password_file: {secret} is readable by other users; run: chmod 600 {secret}"]
    os.chmod(secret, 0o600)
    assert check_config(config) == []


def test_user_without_secret(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert check_config(config) == [
        "xnat: user is set but neither password_env nor password_file; XNAT will refuse the login"]


def test_project_entry_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQR_CHECK_PW", "pw")
    config = load_config(write_config(tmp_path, password_env="DQR_CHECK_PW"))
    asked: list[str] = []

    def entries(project: str) -> list[str]:
        asked.append(project)
        return ["series.include: may only narrow the site's list"]

    assert check_config(config, project_entries=entries) == [
        "projects.NEURO01 (XNAT configuration entry): series.include: may only narrow the site's list"]
    assert asked == ["NEURO01"]


def test_subprocess_missing_file(tmp_path: Path) -> None:
    env = {**os.environ, "DQR_XNAT_CONFIG": str(tmp_path / "missing.yaml")}
    done = subprocess.run([sys.executable, "-m", "dqr_xnat", "config", "check"],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2
    assert f"cannot read {tmp_path / 'missing.yaml'}: No such file or directory" in done.stdout


def test_dcmtk_receiver_needs_dcmtks_storescp(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pw\n", encoding="utf-8")
    os.chmod(secret, 0o600)
    missing = tmp_path / "bin" / "storescp"
    config = load_config(write_config(tmp_path, {"engine": "dcmtk", "storescp": str(missing)},
                                      password_file=str(secret)))
    assert check_config(config) == [
        f"receiver.storescp: DCMTK's '{missing}' was not found: install DCMTK (Debian: apt-get install dcmtk), "
        "or set receiver.storescp to its path"]
    missing.parent.mkdir()
    missing.write_text("#!/usr/bin/env python3\n")  # pynetdicom's app of the same name
    missing.chmod(0o755)
    assert "is a script, not DCMTK's program" in check_config(config)[0]
    config = load_config(write_config(tmp_path, {"engine": "dcmtk"}, password_file=str(secret)))
    assert check_config(config) == []  # DCMTK's storescp is installed here (make setup)
