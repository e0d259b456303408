"""Alias-token renewal against the XNAT emulator, and no secret in any log line or exception."""

from __future__ import annotations

import io
import logging
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from dqr_xnat.adapters.xnat import RENEW_RETRY, IssuedToken, XnatClient
from dqr_xnat.config import XnatConfig, parse_config
from dqr_xnat.errors import ConfigError, DqrError, XnatAuthError
from dqr_xnat.logs import setup_logging
from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from tests.fixtures.xnat import XNAT_PASSWORD, XNAT_PROJECT, XNAT_USER, EmulatorFactory, xnat_config_for

P = XNAT_PROJECT
LIFETIME = 1000.0  # seconds; the emulator's clock is real, the client's is shifted by the tests


class Clock:
    """The client's clock: real time plus an offset the test moves (no sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(seconds=self.offset)


def issues(emu: XnatEmulator) -> int:
    return sum(1 for r in emu.requests if r.path == "/data/services/tokens/issue" and r.status == 200)


def token_config(emu: XnatEmulator, tmp_path: Path, *, lifetime: float = LIFETIME,
                 fraction: float = 0.5) -> tuple[XnatConfig, str, str]:
    """A config logging in with a fresh alias token issued by the emulator (as an admin would)."""
    emu.token_lifetime = lifetime
    alias, secret = emu.issue_token(XNAT_USER)
    config = xnat_config_for(emu, tmp_path, alias, secret)
    return XnatConfig(**{**config.__dict__, "token_renew_fraction": fraction}), alias, secret


def disable_token(emu: XnatEmulator, alias: str) -> None:
    """As if the token expired or an admin invalidated it; live JSESSIONs end too."""
    emu.store.tokens[alias].enabled = False
    emu.expire_sessions()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def renewing(xnat_emulator: XnatEmulator, tmp_path: Path, clock: Clock) -> Iterator[tuple[XnatClient, str, str]]:
    config, alias, secret = token_config(xnat_emulator, tmp_path)
    with XnatClient(config, auto_renew=True, renew_margin=60, clock=clock) as client:
        yield client, alias, secret


# ------------------------------------------------------------------------------------------
# Renewal


def test_configured_token_is_replaced_at_login_and_the_service_outlives_it(
        xnat_emulator: XnatEmulator, renewing: tuple[XnatClient, str, str], tmp_path: Path) -> None:
    client, alias, _ = renewing
    assert issues(xnat_emulator) == 1  # its age is unknown: renewed right after login
    assert client.token_expires_at is not None
    assert timedelta(seconds=LIFETIME - 30) < client.token_expires_at - datetime.now(timezone.utc) \
        <= timedelta(seconds=LIFETIME)
    assert client.projects() == [P] and issues(xnat_emulator) == 1  # not again while young
    disable_token(xnat_emulator, alias)
    assert client.projects() == [P]  # re-login with the renewed token
    assert client.logged_in_user == XNAT_USER and issues(xnat_emulator) == 1
    with pytest.raises(XnatAuthError, match="alias tokens expire"):  # the configured one is dead
        XnatClient(client.config).connect()


def test_renews_once_the_configured_fraction_of_the_lifetime_has_passed(
        xnat_emulator: XnatEmulator, renewing: tuple[XnatClient, str, str], clock: Clock) -> None:
    client, _, _ = renewing
    first = client.token_expires_at
    clock.offset = 0.45 * LIFETIME
    assert not client.renewal_due() and client.projects() == [P] and issues(xnat_emulator) == 1
    clock.offset = 0.55 * LIFETIME
    assert client.renewal_due()
    xnat_emulator.clear_requests()
    assert client.projects() == [P]
    assert issues(xnat_emulator) == 1 and client.token_expires_at != first
    paths = [r.path for r in xnat_emulator.requests]
    assert paths.index("/data/services/tokens/issue") < paths.index("/data/auth") < paths.index("/data/projects")
    assert not client.maybe_renew()  # the new token is young


def test_renew_at_is_the_earlier_of_fraction_and_margin() -> None:
    issued = datetime(2024, 1, 1, tzinfo=timezone.utc)
    token = IssuedToken("a", "s", issued + timedelta(hours=48), issued)
    assert token.renew_at(0.5, 900) == issued + timedelta(hours=24)
    assert token.renew_at(0.99, 3600) == issued + timedelta(hours=47)
    unknown = IssuedToken("a", "s", None, issued)  # XNAT did not say: its 2-day default
    assert unknown.renew_at(0.5, 900) == issued + timedelta(hours=24)


def test_without_auto_renew_only_maybe_renew_renews(xnat_emulator: XnatEmulator, tmp_path: Path, clock: Clock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dqr_xnat")
    config, _, _ = token_config(xnat_emulator, tmp_path)
    with XnatClient(config, clock=clock) as client:
        assert client.projects() == [P] and issues(xnat_emulator) == 0
        assert client.maybe_renew() and issues(xnat_emulator) == 1
        assert not client.maybe_renew()
        clock.offset = LIFETIME - 30  # past the fraction and inside the default margin
        assert client.maybe_renew() and issues(xnat_emulator) == 2
        assert client.projects() == [P]
    assert caplog.text.count("renewed the XNAT alias token; the new one expires") == 2


def test_password_login_never_renews(xnat_emulator: XnatEmulator, xnat_config: XnatConfig) -> None:
    with XnatClient(xnat_config, auto_renew=True) as client:
        assert client.projects() == [P]
        assert not client.renewal_due() and not client.maybe_renew()
    assert issues(xnat_emulator) == 0


def test_failed_renewal_keeps_the_current_token_and_retries_later(
        xnat_emulator: XnatEmulator, tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    config, _, _ = token_config(xnat_emulator, tmp_path)
    xnat_emulator.inject("GET", r"/data/services/tokens/issue", status=503)
    with XnatClient(config, auto_renew=True, clock=clock) as client:
        assert client.projects() == [P]  # the configured token still works
        assert client.token_expires_at is None and "could not renew the XNAT alias token" in caplog.text
        assert client.projects() == [P]
        assert sum(1 for r in xnat_emulator.requests if "tokens/issue" in r.path) == 1  # not on every call
        clock.offset = RENEW_RETRY + 1
        assert client.projects() == [P] and issues(xnat_emulator) == 1 and client.token_expires_at is not None


def test_a_refused_renewed_token_falls_back_to_the_configured_one(
        xnat_emulator: XnatEmulator, renewing: tuple[XnatClient, str, str], caplog: pytest.LogCaptureFixture) -> None:
    client, _, _ = renewing
    renewed = client._token
    assert renewed is not None
    disable_token(xnat_emulator, renewed.alias)
    assert client.projects() == [P]
    assert "refused the alias token this service issued itself" in caplog.text
    assert issues(xnat_emulator) == 2  # logged in with the configured token, which is renewed again


def test_token_renew_fraction_is_checked() -> None:
    base = {"xnat": {"url": "https://x.example.org"}, "pacs": {"p": {"ae_title": "P", "host": "h", "port": 104}},
            "projects": {}, "state_dir": "/s"}
    assert parse_config(base).xnat.token_renew_fraction == 0.5
    with pytest.raises(ConfigError, match=r"xnat.token_renew_fraction: must be between 0 and 1"):
        parse_config({**base, "xnat": {"url": "https://x.example.org", "token_renew_fraction": 1}})


# ------------------------------------------------------------------------------------------
# Secrets


def full_text(exc: BaseException) -> str:
    """The exception as a traceback would show it, chained causes and contexts included."""
    return "".join(traceback.format_exception(exc))


def test_no_secret_in_logs_or_exceptions(xnat_emulator_factory: EmulatorFactory, tmp_path: Path, clock: Clock,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="xnat")
    stream = io.StringIO()
    setup_logging("DEBUG", stream=stream)
    logging.getLogger("xnat").setLevel(logging.DEBUG)
    emu = xnat_emulator_factory()
    errors: list[BaseException] = []

    def expect_failure(action) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(DqrError) as excinfo:
            action()
        errors.append(excinfo.value)

    try:
        # Password login: wrong, then right with failing calls.
        expect_failure(XnatClient(xnat_config_for(emu, tmp_path, XNAT_USER, "Wrong-" + XNAT_PASSWORD)).connect)
        with XnatClient(xnat_config_for(emu, tmp_path)) as client:
            for status in (401, 403, 500):
                emu.inject("*", r"/resources/DQR", status=status, times=None)
                expect_failure(lambda: client.list_files(P, "DQR"))
                expect_failure(lambda: client.upload_file(P, "DQR", "a.csv", b"x"))
                emu.clear_faults()
        # Token login with renewals, failures and a refused token.
        config, alias, secret = token_config(emu, tmp_path)
        with XnatClient(config, auto_renew=True, clock=clock) as client:
            clock.offset = LIFETIME
            emu.inject("GET", r"/data/services/tokens/issue", status=500)
            client.projects()
            clock.offset += RENEW_RETRY + 1
            client.projects()
            renewed = client._token
            emu.inject("*", r"/data/projects", status=401, times=None)
            expect_failure(client.projects)
            emu.clear_faults()
        disable_token(emu, alias)
        expect_failure(XnatClient(config).connect)
        emu.stop()
        expect_failure(XnatClient(config).connect)
    finally:
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers
                                        if not getattr(h, "_dqr_xnat", False)]
    assert renewed is not None and len(errors) == 10
    secrets = [XNAT_PASSWORD, "Wrong-" + XNAT_PASSWORD, secret, renewed.secret,
               *(t.secret for t in emu.store.tokens.values())]
    texts = {"captured log records": caplog.text, "our log handler": stream.getvalue(),
             **{f"error {i}": full_text(e) for i, e in enumerate(errors)}}
    assert "could not renew the XNAT alias token" in stream.getvalue()
    for where, text in texts.items():
        for value in secrets:
            assert value not in text, f"a secret appears in {where}"
    for value in (alias, renewed.alias):  # aliases are registered too: our handler masks them
        assert value not in stream.getvalue() and all(value not in str(e) for e in errors)
