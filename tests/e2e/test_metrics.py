"""/metrics and /health of the service, scraped while a job runs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from dqr_xnat.service import Service
from tests.e2e.helpers import load, write_config
from tests.fixtures.xnat import XNAT_PROJECT

CSV = "Accession Number,Subject,Session\nACC0101,Subj001,Subj001_CT1\nACC0201,Subj002,Subj002_PT1\n"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly these labels (in any order), 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_metrics_scraped_during_an_import_and_health(
    make_pacs, synthetic_catalog, synthetic_files, xnat_emulator, pacs_receiver_port, tmp_path
):
    orthanc = make_pacs("orthanc")  # private: this test stops it to see /health fail
    config = load(write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port,
                               service={"metrics_port": 0}))
    xnat_emulator.put_resource_file(XNAT_PROJECT, "DQR", "batch.csv", CSV.encode())
    # Slow uploads down so the scrape below happens while the job runs.
    xnat_emulator.inject("POST", r"/services/import", status=None, times=2, delay=1.0)
    scrapes: list[str] = []
    with Service(config) as service:
        base = f"http://127.0.0.1:{service.metrics_server.port}"
        status, body = _get(base + "/health")
        assert status == 200, body
        health = json.loads(body)
        assert health["xnat"] == "ok" and health["pacs"]["orthanc"].startswith("ok")
        assert health["receiver"] == "ok"

        worker = threading.Thread(target=service.serve, kwargs={"once": True})
        worker.start()
        while worker.is_alive():
            scrapes.append(_get(base + "/metrics")[1])
            time.sleep(0.2)
        final = _get(base + "/metrics")[1]
        orthanc.kill()
        status, body = _get(base + "/health")
        assert status == 503 and "orthanc" in json.loads(body)["pacs"]
    assert any(_value(s, "dqr_xnat_jobs", state="running") == 1 for s in scrapes)
    assert _value(final, "dqr_xnat_jobs", state="done") == 1
    assert _value(final, "dqr_xnat_studies", state="done") == 2
    assert _value(final, "dqr_xnat_instances_total", stage="retrieved", pacs="orthanc") == 33 + 41
    assert _value(final, "dqr_xnat_instances_total", stage="uploaded", pacs="orthanc") == 33 + 41
    assert _value(final, "dqr_xnat_bytes_total", stage="retrieved", pacs="orthanc") > 0
    assert _value(final, "dqr_xnat_pacs_operation_seconds_count", pacs="orthanc", operation="c-move") == 2
    assert "PatientName" not in final and "ACC0101" not in final


def test_health_reports_a_dead_storescp_and_the_next_import_starts_it_again(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    """receiver.engine dcmtk: /health watches the storescp process; a retrieval brings it back."""
    config = load(write_config(tmp_path, orthanc, xnat_emulator, pacs_receiver_port, engine="dcmtk",
                               service={"metrics_port": 0}))
    xnat_emulator.put_resource_file(XNAT_PROJECT, "DQR", "batch.csv", CSV.encode())
    with Service(config) as service:
        base = f"http://127.0.0.1:{service.metrics_server.port}"
        assert json.loads(_get(base + "/health")[1])["receiver"] == "ok"
        process = service.receiver._process
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status, body = _get(base + "/health")
        assert status == 503
        assert json.loads(body)["receiver"].startswith("error: storescp (receiver DQRTEST) is not running")
        service.serve(once=True)
        assert _get(base + "/health")[0] == 200
        final = _get(base + "/metrics")[1]
    assert _value(final, "dqr_xnat_studies", state="done") == 2
    assert _value(final, "dqr_xnat_instances_total", stage="uploaded", pacs="orthanc") == 33 + 41
