"""Project owners' narrowing of the admins' per-project settings (issue 6, item 1).

Owners write YAML (JSON is YAML too) into XNAT's project configuration service, tool ``dqr-xnat``,
path ``settings`` (xnat-contract.md §2.3)::

    pacs: [research_pacs]            # a subset of the admins' list; the first becomes the default
    series:
      include: ["T1*", "FLAIR*"]     # a series must match the admins' includes AND these
      exclude: ["*localizer*"]       # added to the admins' excludes
      modality_include: [MR]
      modality_exclude: [SR]
    multiple_matches: ambiguous      # suffix -> ambiguous only
    report_patient_identity: false   # true -> false only
    max_rows: 500                    # lower only
    max_studies: 1000                # lower only

Why every key is checked separately and never fails the whole entry: an owner's mistake must not
stop the project, and must never widen what the admins allowed. A key with any problem is ignored
and the admins' value is kept; every problem is returned as text for the project's report resource
(:func:`render_settings_problems`, uploaded as ``settings.problems.txt``) and for ``config check``.

Series includes cannot be merged into one pattern list (the admins' list and the owners' list are
each an OR of globs, and the rule is admin AND owner), so the owners' includes go into
``SeriesFilter.include`` when the admins gave none, and into ``also_include`` otherwise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Protocol

import yaml

from dqr_xnat.config import MATCH_POLICIES, Config, ProjectConfig, _closest, _Loader
from dqr_xnat.errors import XnatError
from dqr_xnat.model import SeriesFilter

SETTINGS_TOOL = "dqr-xnat"
SETTINGS_PATH = "settings"
#: Name of the file, in the project's report resource, that lists the entry's problems.
SETTINGS_PROBLEMS_FILE = "settings.problems.txt"
#: The entry is a handful of keys; anything bigger is a mistake (or an attempt to exhaust memory).
MAX_SETTINGS_BYTES = 64 * 1024

SETTINGS_KEYS = ("pacs", "series", "multiple_matches", "report_patient_identity", "max_rows", "max_studies")
SERIES_KEYS = ("include", "exclude", "modality_include", "modality_exclude")
IGNORED = "ignored (the admins' setting applies)"


class ProjectConfigReader(Protocol):
    """What this module needs from the XNAT adapter (``XnatClient`` provides it)."""

    def read_project_config(self, project: str, tool: str, path: str) -> str | None: ...


# ------------------------------------------------------------------------------------------
# Public API


def effective_settings(admin: ProjectConfig, contents: str | None) -> tuple[ProjectConfig, list[str]]:
    """The admins' settings narrowed by the owners' entry ``contents`` (None = no entry), and its problems.

    Pure. Never widens: a key with any problem is ignored and the admins' value kept.
    """
    if contents is None:
        return admin, []
    size = len(contents.encode("utf-8", "replace"))
    if size > MAX_SETTINGS_BYTES:
        return admin, [f"the entry is {size} bytes; the limit is {MAX_SETTINGS_BYTES}: nothing in it was "
                       "applied (the admins' settings apply)"]
    data, problem = _parse_yaml(contents)
    if problem:
        return admin, [problem]
    if data is None:
        return admin, []  # an empty entry (or only comments) narrows nothing
    if not isinstance(data, dict):
        return admin, [f"the entry must be a YAML mapping with the keys {', '.join(SETTINGS_KEYS)}; it is "
                       f"{_kind(data)}: nothing in it was applied (the admins' settings apply)"]
    narrowing = _Narrowing(admin)
    narrowing.apply(data)
    return narrowing.result, narrowing.problems


def load_effective_settings(xnat: ProjectConfigReader, admin: ProjectConfig) -> tuple[ProjectConfig, list[str]]:
    """Read project ``admin.name``'s entry from XNAT and narrow ``admin`` with it.

    Raises the adapter's XnatError type (retriable stays retriable) with a message naming the entry:
    a project whose owners' restrictions cannot be read must not run with the wider admin settings.
    """
    try:
        contents = xnat.read_project_config(admin.name, SETTINGS_TOOL, SETTINGS_PATH)
    except XnatError as exc:
        raise type(exc)(
            f"the dqr-xnat settings of project '{admin.name}' ({_entry_uri(admin.name)}) cannot be read, "
            f"so its jobs wait until they can: {exc}", project=admin.name, status=exc.status) from None
    return effective_settings(admin, contents)


def render_settings_problems(project: str, problems: list[str], effective: ProjectConfig | None = None) -> str:
    """The text of ``settings.problems.txt``: what is wrong with the entry, and what applies instead."""
    lines = [
        f"dqr-xnat settings of project {project}: {len(problems)} problem(s)",
        "",
        f"Entry: XNAT project configuration {SETTINGS_TOOL}/{SETTINGS_PATH} ({_entry_uri(project)}).",
        "Each setting with a problem was ignored and the admins' setting applies instead; project",
        "owners may narrow the admins' settings, never widen them. Fix the entry, for example with",
        "  curl -u OWNER -X PUT -H 'Content-Type: text/plain' --data-binary @settings.yaml \\",
        f"       'XNAT_URL{_entry_uri(project)}?inbody=true'",
        "and this file disappears once the entry is clean.",
        "",
        "Problems:",
        *(f"  - {p}" for p in problems),
    ]
    if effective is not None:
        lines += ["", "Settings in force:", *(f"  {line}" for line in describe_settings(effective))]
    return "\n".join(lines) + "\n"


def describe_settings(settings: ProjectConfig) -> list[str]:
    """One line per setting, for people (problems file, ``config check``)."""
    s = settings.series
    series = [f"{name}: {', '.join(getattr(s, name))}" for name in (*SERIES_KEYS, "also_include",
                                                                        "also_modality_include")
              if getattr(s, name)]
    return [
        f"pacs: {', '.join(settings.pacs)} (default {settings.default_pacs})",
        "series: " + ("; ".join(series) if series else "every series"),
        f"multiple_matches: {settings.multiple_matches}",
        f"report_patient_identity: {'true' if settings.report_patient_identity else 'false'}",
        f"max_rows: {settings.max_rows}",
        f"max_studies: {settings.max_studies}",
    ]


def project_entry_check(config: Config, xnat: Any) -> Callable[[str], list[str]]:
    """The ``project_entries`` hook of ``cli.config_cmd.check_config``, for a connected XnatClient.

    Returns a function giving one project's entry problems; XNAT failures become problems too.
    """
    def check(project: str) -> list[str]:
        admin = config.projects[project]
        try:
            if not xnat.project_exists(project):
                return [f"project '{project}' does not exist in XNAT at {config.xnat.url}; check the project ID"]
            return load_effective_settings(xnat, admin)[1]
        except XnatError as exc:
            return [str(exc)]
    return check


# ------------------------------------------------------------------------------------------
# Parsing and narrowing


def _parse_yaml(contents: str) -> tuple[Any, str | None]:
    try:
        return yaml.load(contents, Loader=_Loader), None  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(exc, "problem", None) or str(exc)
        return None, (f"{where}not valid YAML ({what}): nothing in the entry was applied "
                      "(the admins' settings apply)")


def _kind(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "true or false", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


class _Narrowing:
    """Applies one entry key by key; ``result`` only ever gets narrower than ``admin``."""

    def __init__(self, admin: ProjectConfig) -> None:
        self.admin = admin
        self.result = admin
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def apply(self, data: dict[Any, Any]) -> None:
        """Key by key, in the entry's order, so problems read top to bottom; null = not given."""
        steps = {"pacs": self.pacs, "series": self.series, "multiple_matches": self.multiple_matches,
                 "report_patient_identity": self.identity, "max_rows": self.limit, "max_studies": self.limit}
        for key, value in data.items():
            step = steps.get(str(key))
            if step is None:
                self.unknown(str(key), "", SETTINGS_KEYS)
            elif value is not None:
                step(str(key), value)

    def unknown(self, key: str, parent: str, allowed: tuple[str, ...]) -> None:
        hint = _closest(key, set(allowed))
        self.problem(f"{parent}{key}", "unknown key" + (f" (did you mean '{hint}'?)" if hint else
                                                        f" (known: {', '.join(allowed)})") + "; ignored")

    # -- keys

    def pacs(self, key: str, value: Any) -> None:
        allowed = self.admin.pacs
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            self.problem(key, f"must be a list of PACS names, not {_kind(value)}; {IGNORED}")
            return
        if not names:
            self.problem(key, f"must list at least one PACS (allowed: {', '.join(allowed)}); {IGNORED}")
            return
        bad = [(i, n) for i, n in enumerate(names) if n not in allowed]
        for i, name in bad:
            self.problem(f"{key}[{i}]", f"'{name}' is not allowed for this project by the admins "
                         f"(allowed: {', '.join(allowed)}); ignored, with the rest of '{key}'")
        if not bad:
            self.result = replace(self.result, pacs=tuple(dict.fromkeys(names)))

    def series(self, key: str, value: Any) -> None:
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping with the keys {', '.join(SERIES_KEYS)}, not {_kind(value)}; "
                         f"{IGNORED}")
            return
        for sub in value:
            if str(sub) not in SERIES_KEYS:
                self.unknown(str(sub), f"{key}.", SERIES_KEYS)
        rules = self.result.series
        for sub in SERIES_KEYS:
            patterns = self.patterns(f"{key}.{sub}", value.get(sub))
            if patterns:
                rules = self.narrow_series(rules, sub, patterns, f"{key}.{sub}")
        self.result = replace(self.result, series=rules)

    def patterns(self, path: str, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            self.problem(path, f"must be a list of patterns (e.g. [\"T1*\", \"*FLAIR*\"]), not {_kind(value)}; "
                         f"{IGNORED}")
            return ()
        empty = [i for i, p in enumerate(items) if not p.strip()]
        if empty:
            self.problem(f"{path}[{empty[0]}]", f"an empty pattern matches nothing useful; '{path}' {IGNORED}")
            return ()
        return tuple(p.strip() for p in items)

    def narrow_series(self, rules: SeriesFilter, sub: str, patterns: tuple[str, ...], path: str) -> SeriesFilter:
        """Excludes add up; includes AND with the admins' (see the module docstring)."""
        if sub.endswith("exclude"):
            return replace(rules, **{sub: tuple(dict.fromkeys((*getattr(rules, sub), *patterns)))})
        second = "also_" + sub
        if not getattr(rules, sub):
            return replace(rules, **{sub: patterns})
        if not getattr(rules, second):
            return replace(rules, **{second: patterns})
        self.problem(path, f"the admins' settings already use both include lists; {IGNORED}")
        return rules

    def multiple_matches(self, key: str, value: Any) -> None:
        if value not in MATCH_POLICIES:
            self.problem(key, f"must be one of {', '.join(MATCH_POLICIES)}, not {value!r}; {IGNORED}")
        elif value == "suffix" and self.admin.multiple_matches != "suffix":
            self.problem(key, "'suffix' is not allowed for this project by the admins (they chose "
                         "'ambiguous': a row matching several studies imports none); ignored")
        else:
            self.result = replace(self.result, multiple_matches=value)

    def identity(self, key: str, value: Any) -> None:
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, not {value!r}; {IGNORED}")
        elif value and not self.admin.report_patient_identity:
            self.problem(key, "true is not allowed for this project by the admins (reports do not show "
                         "patient names and IDs); ignored")
        else:
            self.result = replace(self.result, report_patient_identity=value)

    def limit(self, key: str, value: Any) -> None:
        ceiling = getattr(self.admin, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.problem(key, f"must be a whole number of at least 1, not {value!r}; {IGNORED}")
        elif value > ceiling:
            self.problem(key, f"{value} is above the admins' limit of {ceiling} for this project; ignored "
                         f"({ceiling} applies)")
        else:
            self.result = replace(self.result, **{key: value})


def _entry_uri(project: str) -> str:
    return f"/data/projects/{project}/config/{SETTINGS_TOOL}/{SETTINGS_PATH}"

