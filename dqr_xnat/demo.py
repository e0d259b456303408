"""``dqr-xnat demo``: the whole product on the embedded defaults, on a machine with no PACS or XNAT.

It starts pynetdicom's qrscp loaded with generated studies and the XNAT emulator with a demo
project and service account, writes a configuration file for them, drops an example CSV into the
project's inbox resource as a user would, runs one service pass (``serve --once``), and prints the
report the user would read in XNAT and the prearchive listing.
"""

from __future__ import annotations

import io
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from dqr_xnat.config import load_config
from dqr_xnat.model import JobState
from dqr_xnat.sandbox.pacs_servers import free_port, start_qrscp
from dqr_xnat.sandbox.testdata import default_catalog, write_studies
from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from dqr_xnat.service import Service

DEMO_PROJECT = "DEMO"
DEMO_USER = "dqr-service"
RECEIVER_AE = "DQRXNAT"

#: The example a user uploads: an accession with relabeling, a name + date + modality search,
#: a wildcard name without a session relabel, a row that matches nothing, and a duplicate.
DEMO_CSV = """\
Accession Number,Study Date,Patient Name,Modality,Subject,Session
ACC0101,,,,Subj001,Subj001_CT1
,20230211,DOE^JOHN,MR,Subj001,Subj001_MR1
,,SMITH^*,,Subj002,
ACC9999,,,,Subj003,Subj003_CT1
ACC0101,,,,Subj009,Subj009_CT1
"""


@dataclass
class DemoResult:
    state: JobState
    report_csv: str
    prearchive: list[str]
    config_path: Path


def run_demo(workdir: Path, *, out: TextIO) -> DemoResult:
    """Run the demo in ``workdir`` (wiped first) and print what a user would see."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    say(f"demo: writing synthetic studies into {workdir / 'studies'}")
    files = write_studies(default_catalog(), workdir / "studies")
    receiver_port = free_port()
    say("demo: starting pynetdicom's qrscp as the PACS and loading it")
    pacs = start_qrscp(workdir / "pacs", ae_title="DEMOPACS",
                       destinations={RECEIVER_AE: ("127.0.0.1", receiver_port)})
    try:
        pacs.load(files)
        with XnatEmulator(workdir / "xnat") as xnat:
            password = secrets.token_urlsafe(16)
            xnat.add_user(DEMO_USER, password)
            xnat.add_project(DEMO_PROJECT, owner=DEMO_USER, name="dqr-xnat demo")
            config_path = _write_config(workdir, xnat.url, password, pacs.port, receiver_port)
            say(f"demo: XNAT emulator at {xnat.url}, project {DEMO_PROJECT}; config {config_path}")
            xnat.put_resource_file(DEMO_PROJECT, "DQR", "batch.csv", DEMO_CSV.encode())
            say("demo: a user put DQR/batch.csv into the project:\n")
            say(_indent(DEMO_CSV))
            say("demo: running one service pass (dqr-xnat serve --once) ...\n")
            config = load_config(config_path)
            with Service(config) as service:
                results = service.serve(once=True)
            report = xnat.read_resource_file(DEMO_PROJECT, "DQR_REPORTS", "batch.report.csv").decode()
            say("The report the user reads in XNAT (DQR_REPORTS/batch.report.csv):\n")
            say(_indent(report))
            listing = [f"{s.project}/{s.subject}/{s.folder}  {s.status}  {len(s.files)} files"
                       for s in xnat.prearchive_sessions(DEMO_PROJECT)]
            say("The project's prearchive (project/subject/session, status, files):\n")
            say(_indent("\n".join(sorted(listing)) + "\n"))
            state = next(iter(results.values())) if results else JobState.FAILED
            say(f"demo: job ended {state.value}")
            return DemoResult(state, report, listing, config_path)
    finally:
        pacs.stop()


def _write_config(workdir: Path, xnat_url: str, password: str, pacs_port: int,
                  receiver_port: int) -> Path:
    secret = workdir / "xnat-password"
    secret.write_text(password)
    secret.chmod(0o600)
    config = {
        "xnat": {"url": xnat_url, "user": DEMO_USER, "password_file": str(secret)},
        "receiver": {"ae_title": RECEIVER_AE, "host": "127.0.0.1", "port": receiver_port},
        "pacs": {"demo-pacs": {"ae_title": "DEMOPACS", "host": "127.0.0.1", "port": pacs_port,
                               "retrieve": "c-move", "max_associations": 2,
                               "retry_backoff": 1}},
        "projects": {DEMO_PROJECT: {"pacs": ["demo-pacs"]}},
        "service": {"poll_interval": 5},
        "state_dir": str(workdir / "state"),
    }
    path = workdir / "dqr-xnat.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _indent(text: str) -> str:
    buffer = io.StringIO()
    for line in text.rstrip("\n").splitlines():
        buffer.write("    " + line + "\n")
    return buffer.getvalue()
