"""Run a real uvicorn server on 127.0.0.1 in a background thread for a test."""

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve(app: Any, **options: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port; yield its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if config.is_ssl else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def raw_http(url: str, request: bytes, *, timeout: float = 10) -> tuple[int, bytes]:
    """Send ``request`` bytes over plain TCP; return the status and body.

    For requests an HTTP client library would refuse to send, such as a
    ``Content-Length`` that does not match the body.
    """
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def raw_https(
    url: str, request: bytes, context: ssl.SSLContext, *, timeout: float = 10
) -> tuple[int, bytes]:
    """Like ``raw_http`` over TLS with ``context`` (a client certificate context)."""
    host, port = url.removeprefix("https://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=timeout)
    with connection, context.wrap_socket(connection, server_hostname=host) as tls:
        tls.sendall(request)
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
