"""Docker HEALTHCHECK for ``dqr-xnat serve``: exit 0 healthy, 1 unhealthy, one line saying why.

Cheap on purpose (it runs every 30 s): it reads the YAML and asks the running service, it never
starts a second client of XNAT or the PACS itself.

* ``service.metrics_port`` set: GET ``http://127.0.0.1:<metrics_port>/health``; healthy on HTTP 200.
  That endpoint (issue 7) reports whether XNAT and each PACS answer.
* otherwise, when some PACS retrieves by C-MOVE: the service's DICOM receiver accepts a TCP
  connection on ``receiver.port``. A bare connect is silent in the receiver's log, unlike a
  DICOM association from an AE title it does not know.
* otherwise there is nothing listening to ask; the container running means the process runs.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request

from dqr_xnat.config import Config, load_config
from dqr_xnat.errors import ConfigError
from dqr_xnat.model import RetrieveMethod

TIMEOUT_S = 5.0
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def check_health_endpoint(port: int) -> tuple[bool, str]:
    """The service's own verdict on XNAT and the PACS."""
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            return reply.status == 200, f"{url}: HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(200).decode("utf-8", "replace").strip()
        return False, f"{url}: HTTP {exc.code} {body}".rstrip()
    except OSError as exc:
        return False, f"{url}: no answer ({getattr(exc, 'reason', exc)})"


def check_receiver(host: str, port: int) -> tuple[bool, str]:
    """The C-MOVE destination accepts connections (a listening address of 0.0.0.0 means any)."""
    target = "127.0.0.1" if host in WILDCARD_HOSTS else host
    try:
        socket.create_connection((target, port), timeout=TIMEOUT_S).close()
    except OSError as exc:
        return False, f"receiver {target}:{port}: not accepting connections ({exc.strerror or exc})"
    return True, f"receiver {target}:{port}: accepting connections"


def check(config: Config) -> tuple[bool, str]:
    if config.service.metrics_port is not None:
        return check_health_endpoint(config.service.metrics_port)
    if any(p.retrieve is RetrieveMethod.C_MOVE for p in config.pacs.values()):
        return check_receiver(config.receiver.host, config.receiver.port)
    return True, "no health endpoint and no receiver configured: nothing to ask"


def main() -> int:
    try:
        config = load_config(sys.argv[1] if len(sys.argv) > 1 else None)
    except ConfigError as exc:
        print(f"unhealthy: {exc}")
        return 1
    healthy, why = check(config)
    print(f"{'healthy' if healthy else 'unhealthy'}: {why}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
