"""The deployment files in docker/: they validate, reference what exists, and agree with each other.

No Docker engine is needed (nor used): Debian's ``docker-compose`` 1.29 checks the compose file
offline (``make setup`` installs it; missing is a failure). The demo wiring is exercised for real:
Orthanc runs with docker/orthanc/orthanc.json and moves a study into a receiver configured by
docker/config/dqr-xnat.yaml, with only hosts and ports rewritten to loopback.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import re
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml

from dqr_xnat.adapters.pacs import PacsClient, StorageSCP
from dqr_xnat.cli.config_cmd import check_config
from dqr_xnat.config import CONFIG_ENV, Config, load_config
from dqr_xnat.sandbox.pacs_servers import HOST, free_port, start_orthanc
from dqr_xnat.sandbox.testdata import default_catalog, write_studies

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_FILE = DOCKER / "example.env"
SERVICE_DOCKERFILE = DOCKER / "Dockerfile"
XNAT_DOCKERFILE = DOCKER / "xnat" / "Dockerfile"
SERVICE_CONFIG = DOCKER / "config" / "dqr-xnat.yaml"
ORTHANC_CONFIG = DOCKER / "orthanc" / "orthanc.json"
HEALTHCHECK = DOCKER / "healthcheck.py"
SERVICE = "dqr-xnat"

Instruction = tuple[str, str]  # (KEYWORD, arguments)


# ------------------------------------------------------------------------------------------
# helpers


def docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's docker-compose on our compose file, isolated from the caller's environment."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose not found on PATH: install the Debian package docker-compose "
                    "(`make setup` does it)")
    settings = {line.split("=", 1)[0] for line in ENV_FILE.read_text().splitlines()
                if "=" in line and not line.lstrip().startswith("#")}
    env = {k: v for k, v in os.environ.items() if k not in settings and not k.startswith("COMPOSE_")}
    return subprocess.run([exe, "-f", str(COMPOSE_FILE), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """(KEYWORD, arguments) per instruction: comments dropped, ``\\`` continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    return instructions


def only(instructions: list[Instruction], keyword: str) -> str:
    found = [args for kw, args in instructions if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD (shell form would wrap PID 1 in /bin/sh)."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Source paths of every COPY/ADD (flags like --chown dropped; the last word is the target)."""
    sources: list[str] = []
    for keyword, arguments in instructions:
        if keyword in ("COPY", "ADD"):
            words = [w for w in arguments.split() if not w.startswith("--")]
            assert len(words) >= 2, f"{keyword} {arguments}: needs a source and a target"
            assert "://" not in arguments, f"{keyword} {arguments}: no downloads in the service image"
            sources += words[:-1]
    return sources


def env_value(instructions: list[Instruction], name: str) -> str:
    """The value an ``ENV a=b c=d`` sets for ``name``."""
    for keyword, arguments in instructions:
        if keyword == "ENV":
            for word in arguments.split():
                key, _, value = word.partition("=")
                if key == name:
                    return value
    raise AssertionError(f"no ENV {name}")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(_glob_match(prefix, glob) for prefix in prefixes):
            ignored = not negated
    return ignored


def _glob_match(path: str, glob: str) -> bool:
    """Path-segment glob: ``*`` stays inside a segment, ``**`` spans any number of them."""
    def match(names: list[str], pats: list[str]) -> bool:
        if not pats:
            return not names
        if pats[0] == "**":
            return any(match(names[i:], pats[1:]) for i in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], pats[0]) and match(names[1:], pats[1:])

    return match(path.split("/"), glob.split("/"))


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dqr_docker_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def container_port(mapping: Any) -> int:
    """The container side of a port entry of ``docker-compose config`` output."""
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).split("/")[0].rsplit(":", 1)[-1])


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (host path or volume name), from ``docker-compose config``."""
    targets = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            targets[target] = source
    return targets


# ------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it with the example settings."""
    result = docker_compose("--env-file", str(ENV_FILE), "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def service_dockerfile() -> list[Instruction]:
    return dockerfile_instructions(SERVICE_DOCKERFILE)


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(SERVICE_CONFIG)


# ------------------------------------------------------------------------------------------
# the compose file


def test_compose_file_validates_with_docker_compose() -> None:
    result = docker_compose("--env-file", str(ENV_FILE), "config", "-q")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"


def test_compose_file_refuses_to_start_without_the_passwords(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = docker_compose("--env-file", str(empty), "config", "-q")
    assert result.returncode != 0
    assert "XNAT_DATASOURCE_PASSWORD" in result.stderr


def test_compose_brings_up_xnat_postgres_orthanc_and_the_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"xnat-db", "xnat-web", "orthanc", SERVICE}
    assert services["xnat-db"]["image"].startswith("postgres:")
    xnat_context = Path(services["xnat-web"]["build"]["context"])
    assert xnat_context == DOCKER / "xnat" and (xnat_context / "Dockerfile").is_file()
    assert services["orthanc"]["image"].split(":")[0] in ("jodogne/orthanc", "orthancteam/orthanc")
    assert services["orthanc"]["environment"]["TCP_NODELAY"] == "1"


def test_compose_builds_the_service_image_from_the_repository(compose: dict[str, Any]) -> None:
    build = compose["services"][SERVICE]["build"]
    assert Path(build["context"]) == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == SERVICE_DOCKERFILE


def test_compose_mounts_config_state_and_secret_where_the_image_and_config_expect_them(
    compose: dict[str, Any], service_dockerfile: list[Instruction], config: Config
) -> None:
    service = compose["services"][SERVICE]
    mounts = volume_targets(service)
    config_path = env_value(service_dockerfile, CONFIG_ENV)
    assert Path(mounts[config_path]) == SERVICE_CONFIG
    assert service["environment"][CONFIG_ENV] == config_path
    state = str(config.state_dir)
    assert mounts[state] in compose["volumes"], "the state directory must be a named volume"
    assert json.loads(only(service_dockerfile, "VOLUME")) == [state]
    secret = service["secrets"][0]
    target = secret.get("target") or f"/run/secrets/{secret['source']}"
    assert config.xnat.password_file == target
    assert Path(compose["secrets"][secret["source"]]["file"]).parent == DOCKER / "secrets"


def test_compose_publishes_the_receiver_and_metrics_ports(
    compose: dict[str, Any], service_dockerfile: list[Instruction], config: Config
) -> None:
    published = {container_port(p) for p in compose["services"][SERVICE]["ports"]}
    assert config.receiver.port in published
    assert only(service_dockerfile, "EXPOSE").split() == [str(config.receiver.port)]
    assert config.service.metrics_port in published


def test_service_config_points_at_the_compose_services(compose: dict[str, Any], config: Config) -> None:
    services = compose["services"]
    assert config.xnat.url == "http://xnat-web:8080"
    assert only(dockerfile_instructions(XNAT_DOCKERFILE), "EXPOSE").split() == ["8080"]
    orthanc = json.loads(ORTHANC_CONFIG.read_text())
    pacs = config.pacs["orthanc"]
    assert pacs.host in services
    assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    mounts = volume_targets(services["orthanc"])
    assert Path(mounts[services["orthanc"]["command"][0]]) == ORTHANC_CONFIG
    receiver = next(m for m in orthanc["DicomModalities"].values() if m["AET"] == config.receiver.ae_title)
    assert (receiver["Host"], receiver["Port"]) == (SERVICE, config.receiver.port)


# ------------------------------------------------------------------------------------------
# the service image


def test_service_image_base_and_copied_files_exist(service_dockerfile: list[Instruction]) -> None:
    assert only(service_dockerfile, "FROM") == "python:3.11-slim"
    sources = copy_sources(service_dockerfile)
    assert sources, "the image must copy the package in"
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for must_reach in ("dqr_xnat/cli/main.py", "dqr_xnat/sandbox/xnat_emulator/server.py"):
        assert not dockerignored(must_reach, patterns), must_reach
    for private in (".venv/bin/python", ".git/config", "docker/secrets/xnat_password", "docker/.env"):
        assert dockerignored(private, patterns), f"{private} would be sent to the Docker daemon"


def test_xnat_image_copies_only_files_that_exist() -> None:
    for source in copy_sources(dockerfile_instructions(XNAT_DOCKERFILE)):
        assert (XNAT_DOCKERFILE.parent / source).is_file(), source


def test_service_image_runs_the_console_script_as_non_root(
    service_dockerfile: list[Instruction],
) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form(only(service_dockerfile, "ENTRYPOINT")) == ["dqr-xnat"]
    assert "dqr-xnat" in scripts
    assert exec_form(only(service_dockerfile, "CMD")) == ["serve"]
    user = only(service_dockerfile, "USER").split(":")[0]
    assert user not in ("root", "0", "")
    assert any(kw == "RUN" and "pip install ." in args for kw, args in service_dockerfile)


def test_service_image_has_storescp_for_the_dcmtk_receiver(service_dockerfile: list[Instruction]) -> None:
    """receiver.engine: dcmtk runs `storescp`: the image must carry DCMTK, installed before USER drops root."""
    keywords = [kw for kw, _ in service_dockerfile]
    installs = [i for i, (kw, args) in enumerate(service_dockerfile)
                if kw == "RUN" and re.search(r"apt-get install\b.*\bdcmtk\b", args)]
    assert installs and installs[0] < keywords.index("USER")


def test_service_image_healthcheck_runs_the_copied_script(service_dockerfile: list[Instruction]) -> None:
    healthcheck = only(service_dockerfile, "HEALTHCHECK")
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    copies = [args.split() for kw, args in service_dockerfile if kw == "COPY"]
    assert ["docker/healthcheck.py", command[-1]] in copies


# ------------------------------------------------------------------------------------------
# the service configuration


def test_service_config_loads_and_checks_clean_with_its_secret(config: Config, tmp_path: Path) -> None:
    secret = tmp_path / "xnat_password"
    secret.write_text("dummy-password\n")
    secret.chmod(0o600)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    local = replace(config, state_dir=state, xnat=replace(config.xnat, password_file=str(secret)))
    assert check_config(local) == []
    assert local.xnat.password() == "dummy-password"
    assert config.projects and all(p.pacs == ("orthanc",) for p in config.projects.values())


def test_demo_orthanc_moves_a_study_into_the_configured_receiver(
    config: Config, tmp_path: Path
) -> None:
    """Orthanc as configured for the demo, our receiver as configured: a real C-MOVE between them.

    Only hosts, ports, storage and HTTP login are rewritten for loopback; the AE titles and the
    permissions (Orthanc refuses C-FIND/C-MOVE from AEs it does not know) are the shipped ones.
    """
    study = min(default_catalog(), key=lambda s: s.instances)
    files = write_studies([study], tmp_path / "study")
    receiver_port = free_port()
    shipped = json.loads(ORTHANC_CONFIG.read_text())
    modalities = {
        name: {**m, "Host": HOST, "Port": receiver_port} if m["AET"] == config.receiver.ae_title else m
        for name, m in shipped["DicomModalities"].items()
    }
    local_only = {"StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort", "RemoteAccessAllowed",
                  "AuthenticationEnabled", "RegisteredUsers"}
    extra = {k: v for k, v in shipped.items() if k not in local_only} | {"DicomModalities": modalities}
    receiver_config = replace(config.receiver, host=HOST, port=receiver_port)
    with start_orthanc(tmp_path / "orthanc", ae_title=shipped["DicomAet"], extra_config=extra) as pacs:
        pacs.load(files)
        # retries=0: a refusal (wrong AE titles or permissions) fails at once instead of retrying
        client = PacsClient(replace(config.pacs["orthanc"], host=HOST, port=pacs.port, retries=0))
        with StorageSCP(receiver_config, config.pacs.values(), tmp_path / "staging") as receiver:
            found = client.find_studies({"StudyInstanceUID": study.study_uid,
                                         "NumberOfStudyRelatedInstances": ""})
            result = client.retrieve(study.study_uid, tmp_path / "out", receiver=receiver)
    assert [s.study_instance_uid for s in found] == [study.study_uid]
    assert result.received == study.instances


# ------------------------------------------------------------------------------------------
# the image's health check


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        code = self.status if self.path == "/health" else 404
        body = b"pacs orthanc: no answer" if code != 200 else b"ok"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_HealthHandler]]]:
    handler = type("Handler", (_HealthHandler,), {})
    server = http.server.HTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_asks_the_health_endpoint(
    config: Config, health_server: tuple[http.server.HTTPServer, type[_HealthHandler]]
) -> None:
    healthcheck = load_healthcheck()
    server, handler = health_server
    local = replace(config, service=replace(config.service, metrics_port=server.server_address[1]))
    assert healthcheck.check(local)[0] is True
    handler.status = 503
    healthy, why = healthcheck.check(local)
    assert not healthy and "503" in why and "pacs orthanc: no answer" in why
    server.shutdown()
    server.server_close()
    healthy, why = healthcheck.check(local)
    assert not healthy and "no answer" in why


def test_healthcheck_without_endpoint_asks_the_receiver(config: Config, tmp_path: Path) -> None:
    healthcheck = load_healthcheck()
    receiver = replace(config.receiver, port=free_port())
    local = replace(config, receiver=receiver, service=replace(config.service, metrics_port=None))
    with StorageSCP(receiver, config.pacs.values(), tmp_path / "staging"):
        assert healthcheck.check(local) == (True, f"receiver 127.0.0.1:{receiver.port}: accepting connections")
    healthy, why = healthcheck.check(local)
    assert not healthy and "not accepting connections" in why


def test_healthcheck_script_exit_codes(tmp_path: Path) -> None:
    """As Docker runs it: exit 1 and a reason when nothing answers, also for a broken config."""
    text = SERVICE_CONFIG.read_text().replace("metrics_port: 9400", f"metrics_port: {free_port()}")
    (tmp_path / "c.yaml").write_text(text)
    (tmp_path / "broken.yaml").write_text("xnat: {}\n")
    for name in ("c.yaml", "broken.yaml"):
        run = subprocess.run([sys.executable, str(HEALTHCHECK), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 1, run
        assert run.stdout.startswith("unhealthy: "), run.stdout
