"""The admin YAML: every key, every default, every problem with its path, secrets kept out."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dqr_xnat.config import (
    CONFIG_ENV,
    AvailabilityWindow,
    Config,
    PacsConfig,
    ProjectConfig,
    ReceiverConfig,
    ServiceConfig,
    Timeouts,
    XnatConfig,
    load_config,
    parse_config,
)
from dqr_xnat.errors import ConfigError
from dqr_xnat.model import RetrieveMethod, SeriesFilter

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "dqr-xnat.example.yaml"

MINIMAL: dict[str, Any] = {
    "xnat": {"url": "https://xnat.example.org"},
    "pacs": {"hospital": {"ae_title": "PACS1", "host": "10.1.2.3", "port": 104}},
    "projects": {"NEURO01": {"pacs": ["hospital"]}},
    "state_dir": "/var/lib/dqr-xnat",
}


def minimal(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "dqr.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# The example file


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.xnat.url == "https://xnat.example.org"
    assert config.xnat.password_env == "XNAT_PASSWORD"
    assert list(config.pacs) == ["hospital", "research"]
    assert config.pacs["hospital"].availability[0] == AvailabilityWindow(
        days=("mon", "tue", "wed", "thu", "fri"), start="18:00", end="07:00", concurrency=2, utilisation=100
    )
    assert config.projects["NEURO01"].default_pacs == "hospital"
    assert config.project_defaults is not None
    assert config.state_dir == Path("/var/lib/dqr-xnat")


def _documented_keys() -> set[str]:
    """Every YAML key the loader accepts, derived from the config dataclasses."""
    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"name", "source"}

    window = {"from" if k == "start" else "to" if k == "end" else k for k in names(AvailabilityWindow)}
    return (names(Config) | names(XnatConfig) | names(ReceiverConfig) | names(PacsConfig)
            | names(Timeouts) | window | names(ProjectConfig) | names(ServiceConfig)
            # also_*: set only by the project owners' narrowing (project_settings.py), not a YAML key
            | names(SeriesFilter) - {"also_include", "also_modality_include"})


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = sorted(k for k in _documented_keys() if not re.search(rf"^[ #-]*{k}:", text, re.M))
    assert missing == []
    # Each key line carries a comment, or the key is explained by the comment block above it.
    assert "password:" not in text.replace("# ", "")  # no secret key, even as an example


def test_example_keys_are_all_accepted(tmp_path: Path) -> None:
    """The commented-out alternative (password_file) is a real key too."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("  password_env: XNAT_PASSWORD", "  password_file: /run/secrets/xnat", 1)
    config = load_config(write(tmp_path, text))
    assert (config.xnat.password_env, config.xnat.password_file) == (None, "/run/secrets/xnat")


# ------------------------------------------------------------------------------------------------
# Defaults and every key


def test_minimal_config_gets_every_default() -> None:
    config = parse_config(minimal())
    assert config.xnat == XnatConfig(url="https://xnat.example.org", user="", password_env=None,
                                     password_file=None, verify_tls=True, ca_bundle=None, timeout=300.0)
    assert config.receiver == ReceiverConfig(ae_title="DQRXNAT", host="0.0.0.0", port=11113,
                                             max_instance_mb=2048, engine="pynetdicom", storescp="storescp")
    assert config.pacs["hospital"] == PacsConfig(
        name="hospital", ae_title="PACS1", host="10.1.2.3", port=104, calling_ae_title="DQRXNAT",
        retrieve=RetrieveMethod.C_MOVE, max_associations=2,
        timeouts=Timeouts(acse=30.0, dimse=120.0, network=120.0, connect=10.0),
        retries=3, retry_backoff=5.0, availability=(),
    )
    assert config.projects["NEURO01"] == ProjectConfig(
        name="NEURO01", pacs=("hospital",), series=SeriesFilter(), multiple_matches="ambiguous",
        report_patient_identity=False, max_rows=5000, max_studies=10000,
    )
    assert config.service == ServiceConfig(
        inbox_resource="DQR", report_resource="DQR_REPORTS", poll_interval=60.0,
        discover_projects=False, serve_unlisted_projects=False, max_csv_mb=10.0, workers=2,
        metrics_port=None, audit_log=None,
    )
    assert config.project_defaults is None
    assert config.state_dir == Path("/var/lib/dqr-xnat")


def test_calling_ae_title_defaults_to_the_receiver_ae_title() -> None:
    config = parse_config(minimal(receiver={"ae_title": "OURS"}))
    assert config.pacs["hospital"].calling_ae_title == "OURS"


def test_window_defaults_cover_the_whole_week() -> None:
    data = minimal()
    data["pacs"]["hospital"]["availability"] = [{}]
    (window,) = parse_config(data).pacs["hospital"].availability
    assert window == AvailabilityWindow(days=("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
                                        start="00:00", end="24:00", concurrency=1, utilisation=100)


FULL = """
xnat:
  url: https://xnat.example.org/
  user: svc
  password_file: /run/secrets/xnat
  verify_tls: false
  ca_bundle: /etc/ssl/ca.pem
  timeout: 12
receiver: {ae_title: RECV, host: 127.0.0.1, port: 4242, max_instance_mb: 64, engine: dcmtk,
           storescp: /opt/dcmtk/bin/storescp}
pacs:
  main:
    ae_title: MAINPACS
    host: pacs.local
    port: 11112
    calling_ae_title: CALLER
    retrieve: c-get
    max_associations: 4
    timeouts: {acse: 1, dimse: 2, network: 3, connect: 4.5}
    retries: 0
    retry_backoff: 0.5
    availability:
      - {days: [Monday, TUE], from: 18:30, to: 06:00, concurrency: 3, utilisation: 25}
projects:
  P1:
    pacs: main
    series:
      include: ["T1*"]
      exclude: ["*dose*"]
      modality_include: [MR]
      modality_exclude: [SR]
    multiple_matches: suffix
    report_patient_identity: true
    max_rows: 10
    max_studies: 20
project_defaults: {pacs: [main], max_rows: 7}
service:
  inbox_resource: IN
  report_resource: OUT
  poll_interval: 5
  discover_projects: true
  serve_unlisted_projects: true
  max_csv_mb: 0.5
  workers: 3
  metrics_port: 9100
  audit_log: /var/log/dqr/audit.jsonl
state_dir: ~/dqr-state
"""


def test_every_key_is_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.xnat == XnatConfig(url="https://xnat.example.org", user="svc", password_env=None,
                                     password_file="/run/secrets/xnat", verify_tls=False,
                                     ca_bundle="/etc/ssl/ca.pem", timeout=12.0)
    assert config.receiver == ReceiverConfig(ae_title="RECV", host="127.0.0.1", port=4242, max_instance_mb=64,
                                             engine="dcmtk", storescp="/opt/dcmtk/bin/storescp")
    assert config.pacs["main"] == PacsConfig(
        name="main", ae_title="MAINPACS", host="pacs.local", port=11112, calling_ae_title="CALLER",
        retrieve=RetrieveMethod.C_GET, max_associations=4,
        timeouts=Timeouts(acse=1.0, dimse=2.0, network=3.0, connect=4.5), retries=0, retry_backoff=0.5,
        availability=(AvailabilityWindow(days=("mon", "tue"), start="18:30", end="06:00",
                                         concurrency=3, utilisation=25),),
    )
    assert config.projects["P1"] == ProjectConfig(
        name="P1", pacs=("main",),
        series=SeriesFilter(include=("T1*",), exclude=("*dose*",), modality_include=("MR",),
                            modality_exclude=("SR",)),
        multiple_matches="suffix", report_patient_identity=True, max_rows=10, max_studies=20,
    )
    assert config.project_defaults == ProjectConfig(name="*", pacs=("main",), max_rows=7)
    assert config.service == ServiceConfig(
        inbox_resource="IN", report_resource="OUT", poll_interval=5.0, discover_projects=True,
        serve_unlisted_projects=True, max_csv_mb=0.5, workers=3, metrics_port=9100,
        audit_log="/var/log/dqr/audit.jsonl",
    )
    assert config.state_dir == Path("~/dqr-state").expanduser()
    assert config.source == str(tmp_path / "dqr.yaml")


# ------------------------------------------------------------------------------------------------
# Problems: every one, with its path, in one pass


def test_unknown_pacs_in_project_names_its_path() -> None:
    data = minimal(projects={"ABC": {"pacs": ["hospital", "pacs2"]}})
    assert problems_of(data) == ["projects.ABC.pacs[1]: unknown PACS 'pacs2'"]
    data = minimal(projects={"ABC": {"pacs": ["hospitl"]}})
    assert problems_of(data) == ["projects.ABC.pacs[0]: unknown PACS 'hospitl'; did you mean 'hospital'?"]


def test_every_problem_is_reported_in_one_pass() -> None:
    data = {
        "xnat": {"url": "xnat.example.org", "verfiy_tls": True, "timeout": 0},
        "receiver": {"port": 70000, "ae_title": "A\\B", "engine": "storescp", "storescp": " "},
        "pacs": {
            "hospital": {"host": "h", "port": "104", "retrieve": "c-find", "max_associations": 0,
                         "timeouts": {"dimse": -1}, "retries": -1,
                         "availability": [{"days": ["mon", "xyz"], "from": "25:00", "to": "7",
                                           "concurrency": 0, "utilisation": 101}]},
        },
        "projects": {"ABC": {"pacs": ["pacs2"], "multiple_matches": "all", "max_rows": 0,
                             "series": {"include": "T1*", "exclude": [1]}},
                     "bad id": {"pacs": ["hospital"]}},
        "service": {"inbox_resource": "X", "report_resource": "X", "workers": True},
        "stat_dir": "/tmp",
    }
    assert sorted(problems_of(data)) == sorted([
        "stat_dir: unknown key; did you mean 'state_dir'?",
        "xnat.verfiy_tls: unknown key; did you mean 'verify_tls'?",
        "xnat.url: must start with http:// or https://, not 'xnat.example.org'",
        "xnat.timeout: must be greater than 0",
        "receiver.ae_title: must be 1-16 printable ASCII characters without backslash",
        "receiver.port: must be a TCP port between 1 and 65535",
        "receiver.engine: must be 'pynetdicom' or 'dcmtk'",
        "receiver.storescp: must not be empty",
        "pacs.hospital.retrieve: must be 'c-move' or 'c-get'",
        "pacs.hospital.timeouts.dimse: must be greater than 0",
        "pacs.hospital.availability[0].days: unknown weekday 'xyz'; use mon, tue, wed, thu, fri, sat, sun",
        "pacs.hospital.availability[0].from: must be a time HH:MM from 00:00 to 24:00",
        "pacs.hospital.availability[0].to: must be a time HH:MM from 00:00 to 24:00",
        "pacs.hospital.availability[0].concurrency: must be greater than 0",
        "pacs.hospital.availability[0].utilisation: must be a percentage from 1 to 100",
        "pacs.hospital.ae_title: is required",
        "pacs.hospital.port: must be an integer, not '104'",
        "pacs.hospital.max_associations: must be greater than 0",
        "pacs.hospital.retries: must be >= 0",
        "projects.ABC.pacs[0]: unknown PACS 'pacs2'",
        "projects.ABC.series.exclude: must be a list of strings",
        "projects.ABC.multiple_matches: must be one of ambiguous, suffix",
        "projects.ABC.max_rows: must be greater than 0",
        "projects.bad id: is not a valid XNAT project ID ([A-Za-z0-9_-])",
        "service.workers: must be an integer, not True",
        "service.report_resource: must differ from service.inbox_resource",
        "state_dir: is required",
    ])


def test_config_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(state_dir=None, receiver={"port": 0}), source="site.yaml")
    text = str(info.value)
    assert text.startswith("site.yaml has 2 problem(s):")
    assert "  receiver.port: must be a TCP port between 1 and 65535" in text
    assert "  state_dir: is required" in text


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "the file must be a YAML mapping with the keys pacs, project_defaults, projects, "
               "receiver, service, state_dir, xnat; it is empty"),
        (["xnat"], "the file must be a YAML mapping with the keys pacs, project_defaults, projects, "
                   "receiver, service, state_dir, xnat; it is a list"),
    ],
)
def test_the_document_must_be_a_mapping(data: Any, expected: str) -> None:
    assert problems_of(data) == [expected]


def test_missing_sections_are_reported_once_each() -> None:
    assert problems_of({"state_dir": "/s"}) == ["xnat: is required", "pacs: must define at least one PACS"]
    assert problems_of({"xnat": None, "pacs": {}, "state_dir": "/s"}) == [
        "xnat: is required", "pacs: must define at least one PACS"]


@pytest.mark.parametrize("section", ["pacs", "projects", "xnat", "receiver", "service"])
@pytest.mark.parametrize("value", [7, "text", ["a"]])
def test_a_section_of_the_wrong_type_is_a_problem_not_a_crash(section: str, value: Any) -> None:
    problems = problems_of(minimal(**{section: value}))
    assert f"{section}: must be a mapping, not {type(value).__name__}" in problems


def test_project_needs_a_pacs() -> None:
    assert problems_of(minimal(projects={"P": {}})) == [
        "projects.P.pacs: must list at least one PACS (the first is the project's default)"]


def test_a_project_may_name_its_pacs_as_a_single_string() -> None:
    assert parse_config(minimal(projects={"P": {"pacs": "hospital"}})).projects["P"].pacs == ("hospital",)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("preview", "'preview' is a reserved inbox folder name; choose another PACS name"),
        ("Reimport", "'Reimport' is a reserved inbox folder name; choose another PACS name"),
        ("my pacs", "a PACS name is a folder name in the inbox: use letters, digits, '_', '-' or '.', "
                    "starting with a letter or digit"),
        ("../x", "a PACS name is a folder name in the inbox: use letters, digits, '_', '-' or '.', "
                 "starting with a letter or digit"),
    ],
)
def test_pacs_names_are_usable_inbox_folders(name: str, message: str) -> None:
    data = minimal(pacs={name: {"ae_title": "A", "host": "h", "port": 104}}, projects={})
    assert problems_of(data) == [f"pacs.{name}: {message}"]


def test_pacs_host_must_not_be_blank() -> None:
    data = minimal()
    data["pacs"]["hospital"]["host"] = " "
    assert problems_of(data) == ["pacs.hospital.host: must not be empty"]


@pytest.mark.parametrize(
    ("window", "problem"),
    [
        ({"from": "24:00"}, "pacs.hospital.availability[0].from: must be before 24:00"),
        ({"to": "24:30"}, "pacs.hospital.availability[0].to: must be a time HH:MM from 00:00 to 24:00"),
        ({"to": "8:00"}, "pacs.hospital.availability[0].to: must be a time HH:MM from 00:00 to 24:00"),
        ({"days": []}, "pacs.hospital.availability[0].days: must list at least one weekday "
                       "(leave it out for every day)"),
        ({"days": ["m"]}, "pacs.hospital.availability[0].days: unknown weekday 'm'; "
                          "use mon, tue, wed, thu, fri, sat, sun"),
        ({"hours": 3}, "pacs.hospital.availability[0].hours: unknown key"),
        ("mon", "pacs.hospital.availability[0]: must be a mapping, not str"),
    ],
)
def test_window_problems(window: Any, problem: str) -> None:
    data = minimal()
    data["pacs"]["hospital"]["availability"] = [window]
    assert problems_of(data) == [problem]


def test_availability_must_be_a_list() -> None:
    data = minimal()
    data["pacs"]["hospital"]["availability"] = {"days": ["mon"]}
    assert problems_of(data) == ["pacs.hospital.availability: must be a list of windows"]


def test_unquoted_times_stay_times(tmp_path: Path) -> None:
    """Plain YAML 1.1 reads 18:00 as the integer 1080; the loader keeps it as text."""
    text = yaml.safe_dump(minimal()) + ""
    text = text.replace("    port: 104\n", "    port: 104\n    availability:\n"
                        "    - {from: 18:00, to: 07:30, days: [sat]}\n")
    (window,) = load_config(write(tmp_path, text)).pacs["hospital"].availability
    assert (window.start, window.end, window.days) == ("18:00", "07:30", ("sat",))


def test_yaml_anchors_and_merges_work(tmp_path: Path) -> None:
    text = """
xnat: {url: "http://x"}
pacs:
  a: &base {ae_title: A, host: h, port: 104, max_associations: 3}
  b:
    <<: *base
    ae_title: B
projects: {}
state_dir: /s
"""
    config = load_config(write(tmp_path, text))
    assert (config.pacs["b"].ae_title, config.pacs["b"].max_associations) == ("B", 3)


# ------------------------------------------------------------------------------------------------
# Secrets


@pytest.mark.parametrize("key", ["password", "token", "secret"])
def test_a_secret_in_the_yaml_is_refused_without_echoing_it(key: str) -> None:
    data = minimal()
    data["xnat"][key] = "hunter2-very-secret"
    problems = problems_of(data)
    assert problems == [f"xnat.{key}: secrets are not read from the YAML; use password_env "
                        "(an environment variable) or password_file (a file only the service can read)"]
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert "hunter2" not in str(info.value)


def test_password_env_and_file_together_are_refused() -> None:
    data = minimal()
    data["xnat"].update(password_env="X", password_file="/f")
    assert problems_of(data) == ["xnat: give password_env or password_file, not both"]


def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    data = minimal()
    data["xnat"]["password_env"] = "DQR_TEST_PW"
    xnat = parse_config(data).xnat
    monkeypatch.setenv("DQR_TEST_PW", "s3cret")
    assert xnat.password() == "s3cret"
    monkeypatch.setenv("DQR_TEST_PW", "rotated")
    assert xnat.password() == "rotated"  # read when needed, not at load time
    monkeypatch.setenv("DQR_TEST_PW", "")
    with pytest.raises(ConfigError, match="environment variable DQR_TEST_PW is empty"):
        xnat.password()
    monkeypatch.delenv("DQR_TEST_PW")
    with pytest.raises(ConfigError) as info:
        xnat.password()
    assert info.value.problems == ["xnat.password_env: environment variable DQR_TEST_PW is not set"]


def test_password_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  s3cret\n", encoding="utf-8")
    data = minimal()
    data["xnat"]["password_file"] = str(secret)
    xnat = parse_config(data).xnat
    assert xnat.password() == "s3cret"
    secret.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        xnat.password()
    secret.unlink()
    with pytest.raises(ConfigError) as info:
        xnat.password()
    assert info.value.problems == [f"xnat.password_file: cannot read {secret}: No such file or directory"]


def test_no_secret_configured_means_no_password() -> None:
    assert parse_config(minimal()).xnat.password() == ""


# ------------------------------------------------------------------------------------------------
# The file itself


def test_bad_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "xnat:\n  url: http://x\n pacs: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert re.match(r"line 3, column \d+: not valid YAML: ", problem), problem
    assert info.value.source == str(path)


def test_duplicate_key_is_an_error_with_its_line(tmp_path: Path) -> None:
    text = "xnat: {url: 'http://x'}\nstate_dir: /a\npacs: {}\nstate_dir: /b\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == ["line 4, column 1: not valid YAML: duplicate key 'state_dir'"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems == [f"cannot read {tmp_path / 'nope.yaml'}: No such file or directory"]


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("pacs: {}\nstate_dir: /caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["line 2, column 16: not UTF-8 text; save the file as UTF-8"]


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, yaml.safe_dump(minimal(state_dir="/from-env")))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config().state_dir == Path("/from-env")
    other = write(tmp_path, yaml.safe_dump(minimal(state_dir="/explicit")), "other.yaml")
    assert load_config(other).state_dir == Path("/explicit")  # an explicit path wins


def test_no_config_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert info.value.problems == [f"no configuration file: pass --config FILE or set {CONFIG_ENV}"]


# ------------------------------------------------------------------------------------------------
# Unlisted projects


def test_unlisted_project_is_ignored_by_default() -> None:
    config = parse_config(minimal(project_defaults={"pacs": ["hospital"]}))
    assert config.project("NEURO01") is config.projects["NEURO01"]
    assert config.project("OTHER") is None


def test_unlisted_project_gets_site_defaults_only_when_allowed() -> None:
    config = parse_config(minimal(project_defaults={"pacs": ["hospital"], "max_rows": 3},
                                  service={"serve_unlisted_projects": True}))
    other = config.project("OTHER")
    assert other == ProjectConfig(name="OTHER", pacs=("hospital",), max_rows=3)
    assert config.project("NEURO01") is config.projects["NEURO01"]


def test_serving_unlisted_projects_needs_defaults() -> None:
    assert problems_of(minimal(service={"serve_unlisted_projects": True})) == [
        "service.serve_unlisted_projects: needs a project_defaults section"]


def test_project_defaults_are_validated_like_a_project() -> None:
    assert problems_of(minimal(project_defaults={"pacs": ["nope"], "max_row": 1})) == [
        "project_defaults.max_row: unknown key; did you mean 'max_rows'?",
        "project_defaults.pacs[0]: unknown PACS 'nope'",
    ]
