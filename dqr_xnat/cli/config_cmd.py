"""``dqr-xnat config check [FILE]``: validate the admin configuration before the service relies on it.

Loading already reports every structural problem with its YAML path; this command adds what only
the running machine can tell (is the secret readable, is the state directory private and writable,
is DCMTK's storescp there for ``receiver.engine: dcmtk``) so an admin finds all of it in one run. Exit 0 when valid, 2 when there is any problem.

Project owners' settings entries in XNAT (``dqr-xnat/settings``, project_settings.py) are checked
through the ``project_entries`` hook of :func:`check_config`: the command logs in with the configured
account and reads each configured project's entry. A login XNAT refuses (wrong secret, TLS) is a
problem; an XNAT it cannot reach is only a note, so the file can still be checked offline (or with
``--offline``, which does not try).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from dqr_xnat.adapters.storescp import dcmtk_executable
from dqr_xnat.config import Config, load_config
from dqr_xnat.errors import ConfigError, PacsError, RetriableXnatError, XnatError
from dqr_xnat.model import RetrieveMethod
from dqr_xnat.project_settings import SETTINGS_PATH, SETTINGS_TOOL, project_entry_check

EXIT_OK, EXIT_PROBLEMS = 0, 2
#: Seconds to wait for XNAT during a check; an admin runs this interactively.
CHECK_TIMEOUT = 10.0

#: Checks one project's configuration entry in XNAT; returns its problems (empty = valid).
ProjectEntryCheck = Callable[[str], list[str]]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("config", help="check the configuration file")
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION")
    actions.required = True
    check = actions.add_parser(
        "check",
        help="validate the configuration and print every problem (exit 0 valid, 2 problems)",
    )
    check.add_argument("file", nargs="?", help="YAML file (default: --config or $DQR_XNAT_CONFIG)")
    check.add_argument("--offline", action="store_true",
                       help="do not contact XNAT (the projects' settings entries are not checked)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = getattr(args, "file", None) or args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(exc.source, exc.problems)
        return EXIT_PROBLEMS
    with _xnat_entries(config, offline=getattr(args, "offline", False)) as xnat:
        problems = xnat.problems + check_config(config, project_entries=xnat.check)
    if problems:
        _print_problems(config.source, problems)
    else:
        print(f"{config.source}: valid; {_summary(config)}")
    if xnat.note:
        print(xnat.note)
    return EXIT_PROBLEMS if problems else EXIT_OK


class _XnatCheck(NamedTuple):
    check: ProjectEntryCheck | None  # None: the entries cannot be checked
    problems: list[str]  # the login itself failed in a way the admin must fix
    note: str  # what was (not) checked, for the admin


@contextlib.contextmanager
def _xnat_entries(config: Config, *, offline: bool) -> Iterator[_XnatCheck]:
    """Log in to XNAT with the configured account, when that can work, to check the projects' entries."""
    entry = f"{SETTINGS_TOOL}/{SETTINGS_PATH}"
    skipped = f"note: the projects' settings entries ({entry}) in XNAT were not checked: "
    if not config.projects:
        yield _XnatCheck(None, [], "")
        return
    if offline or not config.xnat.user or _secret_problems(config):
        why = ("--offline" if offline else "no XNAT account (xnat.user) is configured" if not config.xnat.user
               else "the XNAT secret cannot be used (see above)")
        yield _XnatCheck(None, [], skipped + why)
        return
    from dqr_xnat.adapters.xnat import XnatClient  # xnatpy is slow to import; only when needed

    client = XnatClient(replace(config.xnat, timeout=min(config.xnat.timeout, CHECK_TIMEOUT)))
    try:
        client.connect()
    except RetriableXnatError as exc:
        yield _XnatCheck(None, [], skipped + str(exc))
        return
    except XnatError as exc:
        yield _XnatCheck(None, [f"xnat: {exc}"], skipped + "the login failed")
        return
    try:
        yield _XnatCheck(project_entry_check(config, client), [],
                         f"XNAT at {config.xnat.url}: the settings entries ({entry}) of "
                         f"{len(config.projects)} project(s) were checked")
    finally:
        client.close()


def check_config(config: Config, *, project_entries: ProjectEntryCheck | None = None) -> list[str]:
    """Every problem of a loaded configuration on this machine, plus (hook) each project's XNAT entry.

    ``project_entries`` is called with each configured project ID and returns the problems of that
    project's entry in XNAT; None skips those checks (no XNAT connection).
    """
    problems = [*_secret_problems(config), *_state_problems(config)]
    if config.xnat.ca_bundle and not os.access(config.xnat.ca_bundle, os.R_OK):
        problems.append(f"xnat.ca_bundle: cannot read {config.xnat.ca_bundle}")
    problems += _receiver_problems(config)
    if project_entries is not None:
        for name in config.projects:
            problems += [f"projects.{name} (XNAT configuration entry): {p}" for p in project_entries(name)]
    return problems


def _receiver_problems(config: Config) -> list[str]:
    """engine dcmtk runs DCMTK's storescp: it must be installed (not pynetdicom's same-named app)."""
    if config.receiver.engine != "dcmtk" or all(p.retrieve is not RetrieveMethod.C_MOVE
                                                for p in config.pacs.values()):
        return []
    try:
        dcmtk_executable(config.receiver.storescp)
    except PacsError as exc:
        return [f"receiver.storescp: {exc}, or set receiver.storescp to its path"]
    return []


def _secret_problems(config: Config) -> list[str]:
    xnat = config.xnat
    if not (xnat.password_env or xnat.password_file):
        if xnat.user:
            return ["xnat: user is set but neither password_env nor password_file; "
                    "XNAT will refuse the login"]
        return []
    try:
        xnat.password()
    except ConfigError as exc:
        return exc.problems
    if xnat.password_file and _shared_mode(Path(xnat.password_file)):
        return [f"xnat.password_file: {xnat.password_file} is readable by other users; "
                f"run: chmod 600 {xnat.password_file}"]
    return []


def _state_problems(config: Config) -> list[str]:
    """The state directory holds PHI: it must be writable by us and by nobody else."""
    state = config.state_dir
    if state.exists():
        if not state.is_dir():
            return [f"state_dir: {state} is not a directory"]
        if not os.access(state, os.W_OK | os.X_OK):
            return [f"state_dir: {state} is not writable by this user"]
        if _shared_mode(state):
            return [f"state_dir: {state} is accessible to other users and will hold patient data; "
                    f"run: chmod 700 {state}"]
        return []
    ancestor = next((p for p in state.absolute().parents if p.exists()), None)
    if ancestor is None or not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"state_dir: {state} does not exist and cannot be created under {ancestor}"]
    return []


def _shared_mode(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def _summary(config: Config) -> str:
    pacs = ", ".join(config.pacs)
    projects = ", ".join(config.projects) or "none"
    return f"{len(config.pacs)} PACS ({pacs}); {len(config.projects)} project(s) ({projects})"


def _print_problems(source: str, problems: list[str]) -> None:
    print(f"{source}: {len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
