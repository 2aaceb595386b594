import pytest

from medfed.sites.client import AggregationClient, is_loopback_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", True),
        ("https://localhost:8443/v1", True),
        ("http://[::1]:80", True),
        ("https://aggregation.example.org", False),
        ("http://10.0.0.5:8000", False),
    ],
)
def test_loopback_url_table(url: str, expected: bool) -> None:
    assert is_loopback_url(url) is expected


def test_loopback_client_ignores_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy that does not exist: a client that used it could not connect.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)

    loopback = AggregationClient("http://127.0.0.1:8000")
    remote = AggregationClient("https://aggregation.example.org")

    assert loopback.http_client.trust_env is False
    assert remote.http_client.trust_env is True
