"""Data roots: a configured root is used as it is, downloads go only to the cache."""

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from medfed.errors import DataError
from medfed.sites.data.root import (
    DatasetFile,
    download_cache,
    is_download_cache,
    verified_file,
)

CONTENT = b"age,sex\n63,1\n"


class _Source(BaseHTTPRequestHandler):
    """An official source on 127.0.0.1 that serves CONTENT and counts requests."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(CONTENT)))
        self.end_headers()
        self.wfile.write(CONTENT)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def source() -> Iterator[tuple[DatasetFile, list[str]]]:
    _Source.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Source)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    spec = DatasetFile(
        "demo",
        "demo.csv",
        hashlib.sha256(CONTENT).hexdigest(),
        f"http://127.0.0.1:{server.server_address[1]}/demo.csv",
    )
    yield spec, _Source.requests
    server.shutdown()
    server.server_close()


def test_configured_root_without_file_not_downloaded(
    tmp_path: Path, source: tuple[DatasetFile, list[str]]
) -> None:
    spec, requests = source
    root = tmp_path / "data"
    root.mkdir()

    with pytest.raises(DataError) as raised:
        verified_file(root, spec)

    message = str(raised.value)
    assert f"data file demo/demo.csv not found in data root {root}" in message
    assert f"download it from {spec.url} into {root / 'demo'}/" in message
    assert f"SHA-256 {spec.sha256}" in message
    assert "set data.root or MEDFED_DATA_DIR" in message
    assert requests == []
    assert not (root / "demo").exists()


def test_download_cache_fetches_missing_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: tuple[DatasetFile, list[str]],
) -> None:
    spec, requests = source
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    path = verified_file(download_cache(), spec)

    assert (
        path == tmp_path / "home" / ".cache" / "medfed" / "data" / "demo" / "demo.csv"
    )
    assert path.read_bytes() == CONTENT
    assert requests == ["/demo.csv"]


def test_download_cache_recognized_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    assert is_download_cache(tmp_path / ".cache" / "medfed" / "data")
    assert is_download_cache(tmp_path / ".cache" / "medfed" / "data" / ".." / "data")
    assert not is_download_cache(tmp_path / "data")


def test_missing_root_named_in_error(
    tmp_path: Path, source: tuple[DatasetFile, list[str]]
) -> None:
    spec, requests = source
    root = tmp_path / "mistyped"

    with pytest.raises(DataError) as raised:
        verified_file(root, spec)

    message = str(raised.value)
    assert f"not found in data root {root}, which does not exist;" in message
    assert "set data.root or MEDFED_DATA_DIR" in message
    assert requests == []
    assert not root.exists()
