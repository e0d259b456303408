"""The HTTP plumbing: a threaded loopback server, requests spooled to disk, responses streamed.

Kept apart from the routes so those read like XNAT's resources, not like socket code. HTTP/1.1
keep-alive matters: xnatpy's ``requests.Session`` reuses connections, and the server must drain
every request body (even one it refuses) so the next request on the connection parses.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import logging
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("dqr_xnat.sandbox.xnat_emulator")

CHUNK = 1 << 20


@dataclass
class Request:
    method: str
    raw_path: str  # decoded path as the client sent it
    path: str  # normalised: /data/archive/X -> /data/X, /REST/ -> /data/, no trailing slash
    query: dict[str, str]
    query_all: dict[str, list[str]]
    headers: Message
    body: Path | None
    cookies: dict[str, str]
    login: str | None = None
    set_cookies: list[str] = field(default_factory=list)

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def body_bytes(self) -> bytes:
        return self.body.read_bytes() if self.body is not None else b""

    def body_text(self) -> str:
        return self.body_bytes().decode("utf-8", "replace")

    def form(self) -> dict[str, str]:
        parsed = parse_qs(self.body_text(), keep_blank_values=True)
        return {k: v[-1] for k, v in parsed.items()}

    def basic_credentials(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization") or ""
        if not value.lower().startswith("basic "):
            return None
        try:
            name, _, password = base64.b64decode(value[6:].strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return name, password

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() == "true"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain;charset=UTF-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    file: Path | None = None  # stream this file as the body
    delete_file: bool = False  # the file is a temporary (e.g. a zip built for this answer)


def text(status: int, body: str, content_type: str = "text/plain;charset=UTF-8") -> Response:
    return Response(status, body.encode("utf-8"), content_type)


def json_response(data: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(data).encode("utf-8"), content_type)


def table(rows: list[dict[str, str]], title: str = "") -> Response:
    """XNAT's JSON table: every cell a string, ``totalRecords`` a string too."""
    result = [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]
    return json_response({"ResultSet": {"Result": result, "totalRecords": str(len(result)), "title": title}})


def status_page(status: int, message: str) -> Response:
    """Restlet's error page: xnatpy reports the ``<h3>`` text of a failed login."""
    page = ("<html>\n<head>\n   <title>Status page</title>\n</head>\n<body>\n"
            f"<h3>{html.escape(message)}</h3><p>You can get technical details "
            '<a href="http://www.w3.org/Protocols/rfc2616/rfc2616-sec10.html">here</a>.</p>\n'
            "</body>\n</html>\n")
    return text(status, page, "text/html;charset=UTF-8")


def normalise_path(path: str) -> str:
    """Mount ``/data/archive/X`` and legacy ``/REST/X`` on ``/data/X``, as XNAT does."""
    if path.startswith("/REST/") or path == "/REST":
        path = "/data" + path[5:]
    if path.startswith("/data/archive/"):
        path = "/data/" + path[len("/data/archive/"):]
    elif path == "/data/archive":
        path = "/data"
    return path.rstrip("/") or "/"


def parse_cookies(header: str | None) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            cookies[name] = value
    return cookies


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "XNAT-emulator/1.8.10"
    timeout = 120  # idle keep-alive connections are closed after this

    server: "EmulatorHTTPServer"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are logged by the emulator without paths (labels may derive from PHI)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._serve("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        body = self._spool_body()
        split = urlsplit(self.path)
        raw_path = unquote(split.path)
        query_all = parse_qs(split.query, keep_blank_values=True)
        request = Request(
            method=method,
            raw_path=raw_path,
            path=normalise_path(raw_path),
            query={k: v[-1] for k, v in query_all.items()},
            query_all=query_all,
            headers=self.headers,
            body=body,
            cookies=parse_cookies(self.headers.get("Cookie")),
        )
        try:
            response = self.server.app(request)
        finally:
            if body is not None:
                body.unlink(missing_ok=True)
        self._send(request, response)

    def _spool_body(self) -> Path | None:
        """Read the whole request body to a temporary file (chunked or Content-Length)."""
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        length = int(self.headers.get("Content-Length") or 0)
        if not chunked and length <= 0:
            return None
        with tempfile.NamedTemporaryFile(dir=self.server.tmp_dir, delete=False, suffix=".body") as out:
            if chunked:
                self._copy_chunked(out)
            else:
                self._copy_exact(length, out)
        path = Path(out.name)
        if path.stat().st_size == 0:
            path.unlink()
            return None
        return path

    def _copy_chunked(self, out: Any) -> None:
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            if not self._copy_exact(size, out):
                return
            self.rfile.readline()

    def _copy_exact(self, size: int, out: Any) -> bool:
        """Copy ``size`` body bytes; False if the client hung up first."""
        remaining = size
        while remaining > 0:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                return False
            out.write(data)
            remaining -= len(data)
        return True

    def _send(self, request: Request, response: Response) -> None:
        try:
            length = response.file.stat().st_size if response.file is not None else len(response.body)
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(length))
            for cookie in request.set_cookies:
                self.send_header("Set-Cookie", cookie)
            for name, value in response.headers:
                self.send_header(name, value)
            if request.headers.get("Connection", "").lower() == "close":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if request.method != "HEAD":
                self._write_body(response)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if response.file is not None and response.delete_file:
                response.file.unlink(missing_ok=True)

    def _write_body(self, response: Response) -> None:
        if response.file is None:
            self.wfile.write(response.body)
            return
        with open(response.file, "rb") as fh:
            while data := fh.read(CHUNK):
                self.wfile.write(data)


class EmulatorHTTPServer(ThreadingHTTPServer):
    """A threaded server that can drop its open keep-alive connections when stopped."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: Callable[[Request], Response], tmp_dir: Path) -> None:
        super().__init__(address, _Handler)
        self.app = app
        self.tmp_dir = tmp_dir
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conn_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def drop_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
