"""TLS to XNAT: a loopback HTTPS emulator with a self-signed certificate made by ``openssl``.

The host environment may name a CA bundle (REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE); requests lets those
override a session's ``verify`` (psf/requests#3829), so every test sets them to a bundle that does
NOT trust the emulator and checks that xnat.verify_tls / xnat.ca_bundle still decide.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from dqr_xnat.adapters.xnat import XnatClient
from dqr_xnat.config import XnatConfig
from dqr_xnat.errors import RetriableXnatError, XnatError
from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from tests.fixtures.xnat import XNAT_ADMIN, XNAT_PROJECT, XNAT_USER, xnat_config_for

P = XNAT_PROJECT


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (also its own CA), and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the emulator's certificate, its key, an unrelated CA certificate)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(directory, "xnat")
    other, _ = make_certificate(directory, "other-ca")
    return cert, key, other


@pytest.fixture
def https_xnat(certificates: tuple[Path, Path, Path], tmp_path: Path) -> Iterator[XnatEmulator]:
    cert, key, _ = certificates
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    emulator = XnatEmulator(tmp_path / "xnat", ssl_context=context)
    emulator.add_user(XNAT_USER, "svc-Secret-tls-1")
    emulator.add_user(XNAT_ADMIN, "adm-Secret-tls-2", admin=True)
    emulator.add_project(P, owner=XNAT_ADMIN)
    emulator.grant(P, XNAT_USER, "owner")
    with emulator:
        yield emulator


@pytest.fixture(autouse=True)
def foreign_ca_environment(certificates: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> str:
    other = str(certificates[2])
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", other)
    monkeypatch.setenv("CURL_CA_BUNDLE", other)
    return other


def config(emu: XnatEmulator, tmp_path: Path, **tls: object) -> XnatConfig:
    base = xnat_config_for(emu, tmp_path, XNAT_USER, "svc-Secret-tls-1", timeout=10)
    return XnatConfig(**{**base.__dict__, **tls})


def exercise(client: XnatClient, emu: XnatEmulator) -> None:
    """Calls after login (the pinned session), and a re-login."""
    assert client.projects() == [P]
    client.upload_file(P, "DQR_REPORTS", "r.txt", b"over TLS")
    assert client.read_file(P, "DQR_REPORTS", "r.txt") == b"over TLS"
    emu.expire_sessions()
    assert client.projects() == [P]


def test_an_unknown_certificate_is_refused_by_default(https_xnat: XnatEmulator, tmp_path: Path,
                                                      foreign_ca_environment: str) -> None:
    assert https_xnat.url.startswith("https://127.0.0.1:")
    with pytest.raises(XnatError) as excinfo:
        XnatClient(config(https_xnat, tmp_path)).connect()
    assert not isinstance(excinfo.value, RetriableXnatError)  # retrying cannot fix a certificate
    assert str(excinfo.value) == (f"TLS to XNAT at {https_xnat.url} failed; check xnat.url, xnat.ca_bundle and "
                                  "xnat.verify_tls")
    assert https_xnat.requests == []  # refused during the handshake: nothing was sent


def test_ca_bundle_is_trusted_whatever_the_environment_names(https_xnat: XnatEmulator, tmp_path: Path,
                                                             certificates: tuple[Path, Path, Path],
                                                             foreign_ca_environment: str) -> None:
    with XnatClient(config(https_xnat, tmp_path, ca_bundle=str(certificates[0]))) as client:
        exercise(client, https_xnat)
    assert os.environ["REQUESTS_CA_BUNDLE"] == foreign_ca_environment  # restored after each login
    assert os.environ["CURL_CA_BUNDLE"] == foreign_ca_environment


def test_a_ca_bundle_that_does_not_match_is_refused(https_xnat: XnatEmulator, tmp_path: Path,
                                                    foreign_ca_environment: str) -> None:
    with pytest.raises(XnatError, match="TLS to XNAT"):
        XnatClient(config(https_xnat, tmp_path, ca_bundle=foreign_ca_environment)).connect()


def test_verify_tls_false_connects_and_says_so(https_xnat: XnatEmulator, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with XnatClient(config(https_xnat, tmp_path, verify_tls=False)) as client:
        exercise(client, https_xnat)
    assert any(r.levelno == logging.WARNING and "are NOT verified (xnat.verify_tls: false)" in r.getMessage()
               for r in caplog.records)


def test_the_environment_trust_store_is_the_default(https_xnat: XnatEmulator, tmp_path: Path,
                                                    certificates: tuple[Path, Path, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificates[0]))  # e.g. a hospital CA in the system store
    with XnatClient(config(https_xnat, tmp_path)) as client:
        exercise(client, https_xnat)
