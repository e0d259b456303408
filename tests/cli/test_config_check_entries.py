"""``dqr-xnat config check`` reads every configured project's settings entry from XNAT (the emulator),
and ``load_effective_settings`` reads one; XNAT failures are named, an unreachable XNAT is only a note."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dqr_xnat.adapters.xnat import XnatClient
from dqr_xnat.cli.main import main
from dqr_xnat.config import ProjectConfig
from dqr_xnat.errors import RetriableXnatError, XnatAuthError
from dqr_xnat.project_settings import SETTINGS_PATH, SETTINGS_TOOL, load_effective_settings
from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from tests.fixtures.xnat import XNAT_ADMIN, XNAT_PASSWORD, XNAT_PROJECT, XNAT_USER

P = XNAT_PROJECT
ADMIN = ProjectConfig(name=P, pacs=("hospital", "research"), max_rows=100)


def write_config(tmp_path: Path, url: str, password: str = XNAT_PASSWORD,
                 projects: tuple[str, ...] = (P,)) -> Path:
    secret = tmp_path / "secret"
    secret.write_text(password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    data = {
        "xnat": {"url": url, "user": XNAT_USER, "password_file": str(secret)},
        "pacs": {name: {"ae_title": name.upper(), "host": "127.0.0.1", "port": 104}
                 for name in ("hospital", "research")},
        "projects": {name: {"pacs": ["hospital", "research"], "max_rows": 100} for name in projects},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "dqr.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[str]]:
    code = main(["--config", str(path), "config", "check", *extra])
    return code, capsys.readouterr().out.splitlines()


def config_reads(emu: XnatEmulator) -> list[str]:
    return [r.path for r in emu.requests if "/config/" in r.path]


def test_every_project_entry_is_read_and_its_problems_printed(xnat_emulator: XnatEmulator, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for project in ("CLEAN", "NOENTRY"):
        xnat_emulator.add_project(project, owner=XNAT_ADMIN)
        xnat_emulator.grant(project, XNAT_USER, "member")
    xnat_emulator.set_config(P, SETTINGS_TOOL, SETTINGS_PATH, "pacs: [research, other]\nmax_rows: 50\nmax_row: 1\n")
    xnat_emulator.set_config("CLEAN", SETTINGS_TOOL, SETTINGS_PATH, '{"pacs": ["research"], "max_rows": 10}')
    path = write_config(tmp_path, xnat_emulator.url, projects=(P, "CLEAN", "NOENTRY", "GHOST"))
    code, out = check(path, capsys)
    prefix = "  projects.{} (XNAT configuration entry): "
    assert code == 2
    assert out == [
        f"{path}: 3 problem(s)",
        prefix.format("GHOST") + f"project 'GHOST' does not exist in XNAT at {xnat_emulator.url}; check the "
                                 "project ID",
        prefix.format(P) + "pacs[1]: 'other' is not allowed for this project by the admins (allowed: hospital, "
                           "research); ignored, with the rest of 'pacs'",
        prefix.format(P) + "max_row: unknown key (did you mean 'max_rows'?); ignored",
        f"XNAT at {xnat_emulator.url}: the settings entries (dqr-xnat/settings) of 4 project(s) were checked",
    ]
    assert sorted(config_reads(xnat_emulator)) == sorted(
        f"/data/projects/{p}/config/dqr-xnat/settings" for p in (P, "CLEAN", "NOENTRY"))


def test_clean_entries_exit_0(xnat_emulator: XnatEmulator, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    xnat_emulator.set_config(P, SETTINGS_TOOL, SETTINGS_PATH, "pacs: [research]\n")
    path = write_config(tmp_path, xnat_emulator.url)
    assert check(path, capsys) == (0, [
        f"{path}: valid; 2 PACS (hospital, research); 1 project(s) ({P})",
        f"XNAT at {xnat_emulator.url}: the settings entries (dqr-xnat/settings) of 1 project(s) were checked",
    ])


def test_unreadable_entry_is_a_problem_naming_the_entry(xnat_emulator: XnatEmulator, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    xnat_emulator.inject("GET", r"/config/dqr-xnat/settings", status=500, times=None)
    code, out = check(write_config(tmp_path, xnat_emulator.url), capsys)
    assert code == 2
    assert out[1].startswith(f"  projects.{P} (XNAT configuration entry): the dqr-xnat settings of project "
                             f"'{P}' (/data/projects/{P}/config/dqr-xnat/settings) cannot be read, so its jobs "
                             f"wait until they can: XNAT refused to read configuration 'dqr-xnat/settings' in "
                             f"project '{P}' (HTTP 500")


def test_unreachable_xnat_is_a_note_not_a_problem(xnat_emulator_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    emu = xnat_emulator_factory()
    url = emu.url
    path = write_config(tmp_path, url)
    emu.stop()
    code, out = check(path, capsys)
    assert code == 0 and out[0] == f"{path}: valid; 2 PACS (hospital, research); 1 project(s) ({P})"
    assert out[1].startswith("note: the projects' settings entries (dqr-xnat/settings) in XNAT were not "
                             f"checked: cannot reach XNAT at {url}")


def test_refused_login_is_a_problem_without_the_secret(xnat_emulator: XnatEmulator, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "Wrong-Secret-0a9f3c"
    code, out = check(write_config(tmp_path, xnat_emulator.url, password=wrong), capsys)
    assert code == 2
    assert out[1].startswith(f"  xnat: XNAT at {xnat_emulator.url} refused the login of account '{XNAT_USER}'")
    assert out[-1] == ("note: the projects' settings entries (dqr-xnat/settings) in XNAT were not checked: "
                       "the login failed")
    assert wrong not in "\n".join(out)


def test_offline_does_not_contact_xnat(xnat_emulator: XnatEmulator, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    xnat_emulator.set_config(P, SETTINGS_TOOL, SETTINGS_PATH, "pacs: [other]\n")
    code, out = check(write_config(tmp_path, xnat_emulator.url), capsys, "--offline")
    assert code == 0 and out[-1].endswith("were not checked: --offline")
    assert xnat_emulator.requests == []


# ------------------------------------------------------------------------------------------
# load_effective_settings


def test_load_effective_settings_reads_the_entry(xnat_emulator: XnatEmulator, xnat_client: XnatClient) -> None:
    assert load_effective_settings(xnat_client, ADMIN) == (ADMIN, [])
    xnat_emulator.set_config(P, SETTINGS_TOOL, SETTINGS_PATH, "pacs: [research]\nmax_rows: 500\n")
    settings, problems = load_effective_settings(xnat_client, ADMIN)
    assert settings.pacs == ("research",) and settings.max_rows == 100
    assert problems == ["max_rows: 500 is above the admins' limit of 100 for this project; ignored (100 applies)"]
    xnat_emulator.set_config(P, SETTINGS_TOOL, SETTINGS_PATH, "pacs: [research]\n", status="disabled")
    assert load_effective_settings(xnat_client, ADMIN) == (ADMIN, [])


@pytest.mark.parametrize(("status", "kind"), [(503, RetriableXnatError), (403, XnatAuthError)])
def test_load_effective_settings_keeps_the_error_kind(status: int, kind: type[Exception], xnat_emulator: XnatEmulator,
                                                      xnat_client: XnatClient) -> None:
    xnat_emulator.inject("GET", r"/config/dqr-xnat/settings", status=status, times=2)
    with pytest.raises(kind) as excinfo:
        load_effective_settings(xnat_client, ADMIN)
    assert str(excinfo.value).startswith(f"the dqr-xnat settings of project '{P}' (/data/projects/{P}/config/"
                                         "dqr-xnat/settings) cannot be read, so its jobs wait until they can: ")
    assert excinfo.value.project == P and excinfo.value.status == status  # type: ignore[attr-defined]
