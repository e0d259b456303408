"""The YAML configuration: one file, one schema, validated in full before anything starts.

Every problem is reported with its YAML path (``projects.ABC.pacs[0]: unknown PACS 'pacs2'``), all
in one pass. Secrets never live in the YAML: ``password_env`` names an environment variable and
``password_file`` a file; :meth:`XnatConfig.password` reads them when needed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from dqr_xnat.errors import ConfigError
from dqr_xnat.model import RetrieveMethod, SeriesFilter

CONFIG_ENV = "DQR_XNAT_CONFIG"
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
PROJECT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MATCH_POLICIES = ("ambiguous", "suffix")
#: PACS names are folder names in the inbox (inbox.py), so they must be folder-safe and must not
#: collide with the folders that already mean something there.
PACS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED_FOLDERS = ("preview", "reimport")
#: Keys that would put a secret into the YAML; refused with a message saying what to use instead.
SECRET_KEYS = ("password", "token", "secret")


@dataclass(frozen=True)
class XnatConfig:
    url: str
    user: str = ""
    password_env: str | None = None
    password_file: str | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None
    timeout: float = 300.0
    #: An alias token the service issued itself is renewed once this fraction of its lifetime has
    #: passed (adapters/xnat.py); the configured token's age is unknown, so it is renewed at once.
    token_renew_fraction: float = 0.5

    def password(self) -> str:
        """Read the secret now (env var or file), so rotations apply without a restart."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if not value:
                state = "is not set" if value is None else "is empty"
                raise ConfigError(
                    [f"xnat.password_env: environment variable {self.password_env} {state}"]
                )
            return value
        if self.password_file:
            try:
                value = Path(self.password_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise ConfigError(
                    [f"xnat.password_file: cannot read {self.password_file}: {why}"]
                ) from None
            if not value:
                raise ConfigError([f"xnat.password_file: {self.password_file} is empty"])
            return value
        return ""


@dataclass(frozen=True)
class ReceiverConfig:
    ae_title: str = "DQRXNAT"
    host: str = "0.0.0.0"
    port: int = 11113
    max_instance_mb: int = 2048  # larger instances are refused (hostile or broken PACS)
    engine: str = "pynetdicom"  # or "dcmtk": DCMTK's storescp, managed by the service (bulk pulls)
    storescp: str = "storescp"  # the storescp executable for engine dcmtk (a name on PATH or a path)


@dataclass(frozen=True)
class Timeouts:
    acse: float = 30.0
    dimse: float = 120.0
    network: float = 120.0
    connect: float = 10.0


@dataclass(frozen=True)
class AvailabilityWindow:
    """A weekly window in which a PACS may be used (DQR's schedule)."""

    days: tuple[str, ...]  # subset of WEEKDAYS
    start: str  # "HH:MM"
    end: str  # "HH:MM"; end <= start means the window runs past midnight
    concurrency: int = 1
    utilisation: int = 100  # percent; at X% wait (100/X - 1) x last request duration


@dataclass(frozen=True)
class PacsConfig:
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    retrieve: RetrieveMethod = RetrieveMethod.C_MOVE
    max_associations: int = 2
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: int = 3
    retry_backoff: float = 5.0
    availability: tuple[AvailabilityWindow, ...] = ()  # empty = always available


@dataclass(frozen=True)
class ProjectConfig:
    name: str
    pacs: tuple[str, ...]  # allowed; the first is the default
    series: SeriesFilter = field(default_factory=SeriesFilter)
    multiple_matches: str = "ambiguous"  # or "suffix" (_1, _2 in study date order)
    report_patient_identity: bool = False
    max_rows: int = 5000
    max_studies: int = 10000

    @property
    def default_pacs(self) -> str:
        return self.pacs[0]


@dataclass(frozen=True)
class ServiceConfig:
    inbox_resource: str = "DQR"
    report_resource: str = "DQR_REPORTS"
    poll_interval: float = 60.0
    discover_projects: bool = False  # serve every project that has the inbox resource
    serve_unlisted_projects: bool = False  # with discovery: unlisted projects get project_defaults
    max_csv_mb: float = 10.0
    workers: int = 2  # relabel/upload worker threads
    processes: int | None = None  # worker processes receiving and relabeling; None = one per core, 0 = none
    study_attempts: int = 3  # tries per study (retrieve/upload) before it fails
    metrics_port: int | None = None  # /metrics and /health; None = off (0 = any free port)
    metrics_host: str = "127.0.0.1"
    audit_log: str | None = None  # default: <state_dir>/audit.jsonl


@dataclass(frozen=True)
class Config:
    xnat: XnatConfig
    receiver: ReceiverConfig
    pacs: Mapping[str, PacsConfig]
    projects: Mapping[str, ProjectConfig]
    state_dir: Path
    service: ServiceConfig = field(default_factory=ServiceConfig)
    project_defaults: ProjectConfig | None = None
    source: str = "configuration"

    def project(self, name: str) -> ProjectConfig | None:
        """The settings for ``name``, falling back to site defaults only if the admin allows it."""
        if name in self.projects:
            return self.projects[name]
        if self.service.serve_unlisted_projects and self.project_defaults is not None:
            return replace(self.project_defaults, name=name)
        return None


# ------------------------------------------------------------------------------------------
# Loading


class _Reader:
    """Walks the YAML tree, collecting every problem with its path instead of stopping."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, not {type(value).__name__}")
            return {}
        for key in value:
            if str(key) not in allowed:
                hint = _closest(str(key), allowed)
                self.problem(
                    f"{path}.{key}" if path else str(key),
                    "unknown key" + (f"; did you mean '{hint}'?" if hint else ""),
                )
        return {str(k): v for k, v in value.items()}

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in data or data[key] is None:
            if required:
                self.problem(full, "is required")
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            self.problem(full, f"must be {names}, not {value!r}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(full, message)
                return default
        return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _closest(word: str, options: set[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return found[0] if found else None


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port between 1 and 65535"


def _ae_title(value: str) -> str | None:
    if not AE_TITLE_RE.match(value) or not value.strip():
        return "must be 1-16 printable ASCII characters without backslash"
    return None


def _not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _hhmm(value: str) -> str | None:
    m = re.fullmatch(r"(\d{2}):(\d{2})", value)
    if not m or int(m.group(1)) > 23 and value != "24:00" or int(m.group(2)) > 59:
        return "must be a time HH:MM from 00:00 to 24:00"
    return None


def _string_list(reader: _Reader, value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        reader.problem(path, "must be a list of strings")
        return ()
    return tuple(value)


def _read_xnat(r: _Reader, raw: Any) -> XnatConfig:
    keys = {"url", "user", "password_env", "password_file", "verify_tls", "ca_bundle", "timeout",
            "token_renew_fraction"}
    secrets = {k for k in SECRET_KEYS if isinstance(raw, dict) and k in raw}
    for key in sorted(secrets):  # clearer than the generic 'unknown key'
        r.problem(f"xnat.{key}", "secrets are not read from the YAML; use password_env "
                  "(an environment variable) or password_file (a file only the service can read)")
    d = r.mapping(raw, "xnat", keys | secrets)
    url = r.get(d, "url", "xnat", str, "", required=raw is not None)
    if url and not re.match(r"^https?://", url):
        r.problem("xnat.url", f"must start with http:// or https://, not {url!r}")
    env = r.get(d, "password_env", "xnat", str)
    pfile = r.get(d, "password_file", "xnat", str)
    if env and pfile:
        r.problem("xnat", "give password_env or password_file, not both")
    return XnatConfig(
        url=url.rstrip("/") if url else "",
        user=r.get(d, "user", "xnat", str, ""),
        password_env=env,
        password_file=pfile,
        verify_tls=r.get(d, "verify_tls", "xnat", bool, True),
        ca_bundle=r.get(d, "ca_bundle", "xnat", str),
        timeout=r.get(d, "timeout", "xnat", float, 300.0, check=_positive),
        token_renew_fraction=r.get(d, "token_renew_fraction", "xnat", float, 0.5,
                                   check=lambda v: None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"),
    )


RECEIVER_ENGINES = ("pynetdicom", "dcmtk")


def _read_receiver(r: _Reader, raw: Any) -> ReceiverConfig:
    d = r.mapping(raw, "receiver", {"ae_title", "host", "port", "max_instance_mb", "engine", "storescp"})
    return ReceiverConfig(
        ae_title=r.get(d, "ae_title", "receiver", str, "DQRXNAT", check=_ae_title),
        host=r.get(d, "host", "receiver", str, "0.0.0.0"),
        port=r.get(d, "port", "receiver", int, 11113, check=_port),
        max_instance_mb=r.get(d, "max_instance_mb", "receiver", int, 2048, check=_positive),
        engine=r.get(d, "engine", "receiver", str, "pynetdicom",
                     check=lambda v: None if v in RECEIVER_ENGINES else "must be 'pynetdicom' or 'dcmtk'"),
        storescp=r.get(d, "storescp", "receiver", str, "storescp", check=_not_blank),
    )


def _read_window(r: _Reader, raw: Any, path: str) -> AvailabilityWindow | None:
    d = r.mapping(raw, path, {"days", "from", "to", "concurrency", "utilisation"})
    given = _string_list(r, d.get("days", list(WEEKDAYS)), f"{path}.days")
    days = tuple(day.strip().lower()[:3] for day in given)
    if "days" in d and not given:
        r.problem(f"{path}.days", "must list at least one weekday (leave it out for every day)")
    for day, raw_day in zip(days, given):
        if day not in WEEKDAYS or len(raw_day.strip()) < 3:
            r.problem(f"{path}.days", f"unknown weekday {raw_day!r}; use {', '.join(WEEKDAYS)}")
    start = r.get(d, "from", path, str, "00:00",
                  check=lambda v: _hhmm(v) or ("must be before 24:00" if v == "24:00" else None))
    end = r.get(d, "to", path, str, "24:00", check=_hhmm)
    return AvailabilityWindow(
        days=days,
        start=start,
        end=end,
        concurrency=r.get(d, "concurrency", path, int, 1, check=_positive),
        utilisation=r.get(
            d, "utilisation", path, int, 100,
            check=lambda v: None if 1 <= v <= 100 else "must be a percentage from 1 to 100",
        ),
    )


def _read_pacs(r: _Reader, name: str, raw: Any, receiver: ReceiverConfig) -> PacsConfig:
    path = f"pacs.{name}"
    if not PACS_NAME_RE.match(name):
        r.problem(path, "a PACS name is a folder name in the inbox: use letters, digits, '_', '-' "
                  "or '.', starting with a letter or digit")
    elif name.lower() in RESERVED_FOLDERS:
        r.problem(path, f"'{name}' is a reserved inbox folder name; choose another PACS name")
    d = r.mapping(raw, path, {
        "ae_title", "host", "port", "calling_ae_title", "retrieve", "max_associations",
        "timeouts", "retries", "retry_backoff", "availability",
    })
    method = r.get(d, "retrieve", path, str, "c-move",
                   check=lambda v: None if v in ("c-move", "c-get") else "must be 'c-move' or 'c-get'")
    t = r.mapping(d.get("timeouts"), f"{path}.timeouts", {"acse", "dimse", "network", "connect"})
    tp = f"{path}.timeouts"
    timeouts = Timeouts(
        acse=r.get(t, "acse", tp, float, 30.0, check=_positive),
        dimse=r.get(t, "dimse", tp, float, 120.0, check=_positive),
        network=r.get(t, "network", tp, float, 120.0, check=_positive),
        connect=r.get(t, "connect", tp, float, 10.0, check=_positive),
    )
    windows_raw = d.get("availability") or []
    windows: list[AvailabilityWindow] = []
    if not isinstance(windows_raw, list):
        r.problem(f"{path}.availability", "must be a list of windows")
    else:
        for i, w in enumerate(windows_raw):
            window = _read_window(r, w, f"{path}.availability[{i}]")
            if window:
                windows.append(window)
    return PacsConfig(
        name=name,
        ae_title=r.get(d, "ae_title", path, str, "", required=True, check=_ae_title),
        host=r.get(d, "host", path, str, "", required=True, check=_not_blank),
        port=r.get(d, "port", path, int, 104, required=True, check=_port),
        calling_ae_title=r.get(d, "calling_ae_title", path, str, receiver.ae_title, check=_ae_title),
        retrieve=RetrieveMethod(method or "c-move"),
        max_associations=r.get(d, "max_associations", path, int, 2, check=_positive),
        timeouts=timeouts,
        retries=r.get(d, "retries", path, int, 3, check=lambda v: None if v >= 0 else "must be >= 0"),
        retry_backoff=r.get(d, "retry_backoff", path, float, 5.0,
                            check=lambda v: None if v >= 0 else "must be >= 0"),
        availability=tuple(windows),
    )


PROJECT_KEYS = {"pacs", "series", "multiple_matches", "report_patient_identity", "max_rows", "max_studies"}


def _read_project(r: _Reader, name: str, raw: Any, pacs: Mapping[str, Any], path: str) -> ProjectConfig:
    d = r.mapping(raw, path, PROJECT_KEYS)
    allowed = _string_list(r, d.get("pacs"), f"{path}.pacs")
    if not allowed:
        r.problem(f"{path}.pacs", "must list at least one PACS (the first is the project's default)")
    for i, p in enumerate(allowed):
        if p not in pacs:
            hint = _closest(p, set(pacs))
            r.problem(f"{path}.pacs[{i}]", f"unknown PACS '{p}'" + (f"; did you mean '{hint}'?" if hint else ""))
    s = r.mapping(d.get("series"), f"{path}.series", {"include", "exclude", "modality_include", "modality_exclude"})
    sp = f"{path}.series"
    series = SeriesFilter(
        include=_string_list(r, s.get("include"), f"{sp}.include"),
        exclude=_string_list(r, s.get("exclude"), f"{sp}.exclude"),
        modality_include=_string_list(r, s.get("modality_include"), f"{sp}.modality_include"),
        modality_exclude=_string_list(r, s.get("modality_exclude"), f"{sp}.modality_exclude"),
    )
    return ProjectConfig(
        name=name,
        pacs=allowed,
        series=series,
        multiple_matches=r.get(
            d, "multiple_matches", path, str, "ambiguous",
            check=lambda v: None if v in MATCH_POLICIES else f"must be one of {', '.join(MATCH_POLICIES)}",
        ),
        report_patient_identity=r.get(d, "report_patient_identity", path, bool, False),
        max_rows=r.get(d, "max_rows", path, int, 5000, check=_positive),
        max_studies=r.get(d, "max_studies", path, int, 10000, check=_positive),
    )


def _read_service(r: _Reader, raw: Any) -> ServiceConfig:
    d = r.mapping(raw, "service", set(ServiceConfig.__dataclass_fields__))
    label = lambda v: None if PROJECT_RE.match(v) else "must be a resource label of [A-Za-z0-9_-]"  # noqa: E731
    metrics = r.get(d, "metrics_port", "service", int, None,
                    check=lambda v: None if v == 0 else _port(v))  # 0 = any free port
    return ServiceConfig(
        inbox_resource=r.get(d, "inbox_resource", "service", str, "DQR", check=label),
        report_resource=r.get(d, "report_resource", "service", str, "DQR_REPORTS", check=label),
        poll_interval=r.get(d, "poll_interval", "service", float, 60.0, check=_positive),
        discover_projects=r.get(d, "discover_projects", "service", bool, False),
        serve_unlisted_projects=r.get(d, "serve_unlisted_projects", "service", bool, False),
        max_csv_mb=r.get(d, "max_csv_mb", "service", float, 10.0, check=_positive),
        workers=r.get(d, "workers", "service", int, 2, check=_positive),
        processes=r.get(d, "processes", "service", int, None,
                        check=lambda v: None if v >= 0 else "must be 0 (none) or more"),
        study_attempts=r.get(d, "study_attempts", "service", int, 3, check=_positive),
        metrics_port=metrics,
        metrics_host=r.get(d, "metrics_host", "service", str, "127.0.0.1"),
        audit_log=r.get(d, "audit_log", "service", str),
    )


def _names(section: Any) -> set[str]:
    """The user-chosen keys of a section (PACS or project names): any key is allowed there."""
    return set(map(str, section)) if isinstance(section, dict) else set()


TOP_KEYS = {"xnat", "receiver", "pacs", "projects", "state_dir", "service", "project_defaults"}


def parse_config(data: Any, source: str = "configuration") -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError([f"the file must be a YAML mapping with the keys {', '.join(sorted(TOP_KEYS))}; "
                           f"it is {what}"], source)
    r = _Reader()
    top = r.mapping(data, "", TOP_KEYS)
    if top.get("xnat") is None:
        r.problem("xnat", "is required")
    xnat = _read_xnat(r, top.get("xnat"))
    receiver = _read_receiver(r, top.get("receiver"))
    pacs_raw = r.mapping(top.get("pacs"), "pacs", _names(top.get("pacs")))
    if not pacs_raw and isinstance(top.get("pacs"), (dict, type(None))):
        r.problem("pacs", "must define at least one PACS")
    pacs = {name: _read_pacs(r, name, raw, receiver) for name, raw in pacs_raw.items()}
    projects_raw = r.mapping(top.get("projects"), "projects", _names(top.get("projects")))
    projects = {}
    for name, raw in projects_raw.items():
        if not PROJECT_RE.match(name):
            r.problem(f"projects.{name}", "is not a valid XNAT project ID ([A-Za-z0-9_-])")
        projects[name] = _read_project(r, name, raw, pacs, f"projects.{name}")
    defaults = None
    if top.get("project_defaults") is not None:
        defaults = _read_project(r, "*", top["project_defaults"], pacs, "project_defaults")
    service = _read_service(r, top.get("service"))
    if service.serve_unlisted_projects and defaults is None:
        r.problem("service.serve_unlisted_projects", "needs a project_defaults section")
    if service.inbox_resource == service.report_resource:
        r.problem("service.report_resource", "must differ from service.inbox_resource")
    state_dir = r.get(top, "state_dir", "", str, "", required=True)
    if r.problems:
        raise ConfigError(r.problems, source)
    return Config(
        xnat=xnat,
        receiver=receiver,
        pacs=pacs,
        projects=projects,
        state_dir=Path(state_dir).expanduser(),
        service=service,
        project_defaults=defaults,
        source=source,
    )


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 integers, and refusing duplicate keys.

    Plain YAML reads ``from: 18:00`` as the integer 1080 (and ``08:00`` as a string); admins write
    times unquoted, so times stay strings here. A key given twice is an error, not a silent override.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *defaults' merges may be overridden by the keys that follow
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key '{key_node.value}'", key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_INT_TAG = "tag:yaml.org,2002:int"
_INT_NO_BASE60 = re.compile(
    r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""", re.X
)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, _INT_NO_BASE60 if tag == _INT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the configuration from ``path`` or ``$DQR_XNAT_CONFIG``."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError([f"no configuration file: pass --config FILE or set {CONFIG_ENV}"])
    try:
        raw = Path(chosen).read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read {chosen}: {exc.strerror}"], str(chosen)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([f"line {line}, column {column}: not UTF-8 text; save the file as UTF-8"],
                          str(chosen)) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"], str(chosen)) from None
    return parse_config(data, str(chosen))
