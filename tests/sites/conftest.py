"""Fixtures shared by the site tests."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient


@pytest.fixture
def service(tmp_path: Path) -> Iterator[AggregationClient]:
    """Return a client of a real aggregation service on 127.0.0.1."""
    with (
        LocalAggregationService(
            tmp_path / "aggregation", max_upload_bytes=1 << 20
        ) as running,
        AggregationClient(running.url) as client,
    ):
        yield client
