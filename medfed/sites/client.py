"""HTTP client of the aggregation service, used by sites and the coordinator."""

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from medfed.contract.codecs.ckks import ciphertexts_from_arrays
from medfed.contract.extras import unflatten_groups
from medfed.contract.kits import client_ssl_context
from medfed.errors import ConfigError, EnvelopeError, ServiceError

__all__ = ["AggregationClient", "DownloadedModel", "EncryptedSum"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadedModel:
    version: int
    sha256: str
    weights: dict[str, np.ndarray]
    size: int


@dataclass(frozen=True)
class EncryptedSum:
    """A CKKS round's encrypted sum, as a site downloads it to decrypt."""

    ciphertexts: list[bytes]
    contributors: list[str]
    sample_count: int
    size: int


def is_loopback_url(url: str) -> bool:
    """Return True when ``url`` names this machine (localhost or a loopback IP).

    Clients of such URLs ignore HTTP(S)_PROXY, because a hospital's proxy
    cannot reach the local aggregation service on this machine.
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Seconds a client keeps an idle connection for reuse. It is below the
#: service's ``KEEP_ALIVE_SECONDS``: a request sent on a connection that the
#: service is closing at that moment fails with "connection reset by peer".
KEEPALIVE_EXPIRY_SECONDS = 2.0


def connection_limits() -> httpx.Limits:
    """Return the connection limits of every client of the aggregation service."""
    return httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS)


class AggregationClient:
    """Calls the aggregation service's ``/v1`` API.

    Args:
        base_url: the service's URL, e.g. ``http://127.0.0.1:8765``.
        timeout: seconds to wait for each request.
        http_client: an ``httpx.Client`` to use (for TLS settings); one is
            created when omitted.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http_client or httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            limits=connection_limits(),
            trust_env=not is_loopback_url(self.base_url),
        )

    @classmethod
    def with_kit(
        cls, base_url: str, kit_dir: Path, *, timeout: float = 60.0
    ) -> "AggregationClient":
        """Build a client that authenticates with a startup kit's certificate.

        The client trusts only the study CA, so it reaches only the study's
        aggregation service.
        """
        http_client = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            verify=client_ssl_context(kit_dir),
            limits=connection_limits(),
            trust_env=not is_loopback_url(base_url),
        )
        return cls(base_url, timeout=timeout, http_client=http_client)

    @property
    def http_client(self) -> httpx.Client:
        """The underlying client, shared by the masking protocol's requests."""
        return self._http

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "AggregationClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create_study(self, study: str, initial_model: bytes) -> dict[str, Any]:
        return self._json("POST", f"/v1/studies/{study}", content=initial_model)

    def study_status(self, study: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/studies/{study}")

    def download_model(self, study: str, version: int | None = None) -> DownloadedModel:
        """Download a global model; safetensors is parsed without unpickling."""
        return self._download(
            f"/v1/studies/{study}/models/{'latest' if version is None else version}"
        )

    def download_round_model(self, study: str, round_number: int) -> DownloadedModel:
        """Download the global model that round ``round_number`` trains from."""
        return self._download(f"/v1/studies/{study}/rounds/{round_number}/model")

    def _download(self, path: str) -> DownloadedModel:
        response = self._request("GET", path)
        weights = load_safetensors(response.content)
        return DownloadedModel(
            version=int(response.headers["X-Medfed-Model-Version"]),
            sha256=response.headers["X-Medfed-Model-Sha256"],
            weights=weights,
            size=len(response.content),
        )

    def download_published(
        self, study: str, version: int
    ) -> dict[str, dict[str, np.ndarray]]:
        """Download what the strategy published with model ``version``, by group.

        Empty when nothing was published (the initial model, or a strategy
        that publishes nothing).

        Raises:
            ServiceError: the request failed, or the body is not a safetensors
                file of ``<group>/<name>`` tensors.
        """
        path = f"/v1/studies/{study}/models/{version}/published"
        response = self._request("GET", path)
        try:
            return unflatten_groups(load_safetensors(response.content))
        except (SafetensorError, ValueError, ConfigError) as error:
            raise ServiceError(
                f"aggregation service sent an invalid body for GET {path}: {error}"
            ) from None

    def open_round(
        self,
        study: str,
        round_number: int,
        *,
        sites: Sequence[str],
        quorum: int,
        deadline_seconds: float,
    ) -> dict[str, Any]:
        return self._json(
            "POST",
            f"/v1/studies/{study}/rounds/{round_number}",
            json={
                "sites": list(sites),
                "quorum": quorum,
                "deadline_seconds": deadline_seconds,
            },
        )

    def round_status(self, study: str, round_number: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/studies/{study}/rounds/{round_number}")

    def upload(
        self, study: str, round_number: int, site: str, envelope: bytes
    ) -> dict[str, Any]:
        return self._json(
            "PUT",
            f"/v1/studies/{study}/rounds/{round_number}/updates/{site}",
            content=envelope,
        )

    def upload_asynchronous(
        self, study: str, base_version: int, site: str, envelope: bytes
    ) -> dict[str, Any]:
        """Upload an update trained from ``base_version`` to an asynchronous study."""
        return self._json(
            "PUT",
            f"/v1/studies/{study}/asynchronous/{base_version}/updates/{site}",
            content=envelope,
        )

    def asynchronous_status(self, study: str) -> dict[str, Any]:
        """Return an asynchronous study's latest version, buffer and arrivals."""
        return self._json("GET", f"/v1/studies/{study}/asynchronous")

    def report_asynchronous_privacy(
        self,
        study: str,
        update: int,
        site: str,
        *,
        status: str,
        epsilon_spent: float | None,
        delta: float | None,
        message: str = "",
    ) -> dict[str, Any]:
        """Send the privacy spent by a site's update, or its refusal of one."""
        return self._json(
            "POST",
            f"/v1/studies/{study}/asynchronous/privacy/{site}",
            json={
                "status": status,
                "update": update,
                "epsilon_spent": epsilon_spent,
                "delta": delta,
                "message": message[:500],
            },
        )

    def report_privacy(
        self,
        study: str,
        round_number: int,
        site: str,
        *,
        status: str,
        epsilon_spent: float | None,
        delta: float | None,
        message: str = "",
    ) -> dict[str, Any]:
        """Send the site's privacy spent ("spent") or its refusal ("refused")."""
        return self._json(
            "POST",
            f"/v1/studies/{study}/rounds/{round_number}/privacy/{site}",
            json={
                "status": status,
                "epsilon_spent": epsilon_spent,
                "delta": delta,
                "message": message[:500],
            },
        )

    def download_encrypted_sum(self, study: str, round_number: int) -> EncryptedSum:
        """Download a CKKS round's encrypted sum; parsed without unpickling.

        Raises:
            ServiceError: the request failed; status 425 while uploads are
                still open, or the body is not a sum of ciphertexts.
        """
        path = f"/v1/studies/{study}/rounds/{round_number}/ckks/sum"
        response = self._request("GET", path)
        try:
            ciphertexts = ciphertexts_from_arrays(load_safetensors(response.content))
            sample_count = int(response.headers["X-Medfed-Sample-Count"])
        except (EnvelopeError, SafetensorError, ValueError, KeyError) as error:
            raise ServiceError(
                f"aggregation service sent an invalid encrypted sum for GET {path}: "
                f"{error}"
            ) from None
        contributors = response.headers.get("X-Medfed-Contributors", "")
        return EncryptedSum(
            ciphertexts=ciphertexts,
            contributors=[site for site in contributors.split(",") if site],
            sample_count=sample_count,
            size=len(response.content),
        )

    def upload_decrypted_sum(
        self, study: str, round_number: int, site: str, envelope: bytes
    ) -> dict[str, Any]:
        """Send the sum that ``site`` decrypted, as an ``fp32`` envelope."""
        return self._json(
            "PUT",
            f"/v1/studies/{study}/rounds/{round_number}/ckks/decrypted/{site}",
            content=envelope,
        )

    def withdraw_site(self, study: str, round_number: int, site: str) -> bool:
        """Withdraw ``site`` from a masking round on the coordinator's behalf.

        This is for a site whose task failed without the site withdrawing
        itself, for example because its process was killed. The round then
        stops waiting for the site, as if the site had withdrawn.

        Returns:
            True if this call withdrew the site, False if it had already
            withdrawn.

        Raises:
            ServiceError: the service rejected the withdrawal or is
                unreachable. The service returns 409 when the site already
                uploaded, did not take part in the round's key exchange, or
                the round closed its uploads or was aborted, and 404 when no
                masking round is open.
        """
        response = self._json(
            "POST",
            f"/v1/studies/{study}/rounds/{round_number}/secagg/withdrawals/{site}",
            json={"requested_by": "coordinator"},
        )
        return not response["already_withdrawn"]

    def finalize(
        self, study: str, round_number: int, *, absent: Sequence[str] = ()
    ) -> dict[str, Any]:
        return self._json(
            "POST",
            f"/v1/studies/{study}/rounds/{round_number}/finalize",
            json={"absent": list(absent)},
        )

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._request(method, path, **kwargs).json()
        return result

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ServiceError(
                f"aggregation service at {self.base_url} is unreachable ({method} {path}): {error}"
            ) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServiceError(
                f"aggregation service rejected {method} {path} with {response.status_code}: {detail}",
                status_code=response.status_code,
            )
        return response
