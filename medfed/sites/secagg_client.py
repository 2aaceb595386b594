"""A site's HTTP side of a masking round against the aggregation service.

``MaskingClient.run_round`` drives a ``MaskingSite`` through the routes of
``medfed.aggregation.secagg_routes``: advertise keys, upload encrypted
shares, upload the masked envelope, reveal shares. ``set_up`` and ``finish``
split it before the upload, so a site can exchange keys while it trains. Each GET for the next
phase asks the service to hold it until the phase comes (query parameter
``wait``). When the service answers 425 Too Early, because the wait ended or
it does not hold requests, the client polls again, at most every
``poll_interval``. It returns what the round cost the site
(``MaskingRoundCost``).

A request that fails to connect, loses its connection or gets 502, 503 or
504 is sent again, up to ``attempts`` times in all, with exponential
backoff, so a site rides out a restart of the service. Every request is safe
to repeat: the service acknowledges a message it already accepted again and
changes nothing.
"""

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
from pydantic import TypeAdapter

from medfed.contract.secagg import (
    EncryptedShare,
    KeyRoster,
    MaskingSite,
    RevealRequest,
    parse_message,
)
from medfed.contract.wire import encode_envelope
from medfed.errors import ConfigError, SecureAggregationError, ServiceError
from medfed.sites.client import connection_limits, is_loopback_url

__all__ = [
    "BackgroundMaskingRound",
    "MaskingClient",
    "MaskingRoundCost",
    "MaskingSetup",
]

logger = logging.getLogger(__name__)

_CONFLICT = 409
_TOO_EARLY = 425
_SHARE_LIST = TypeAdapter(list[EncryptedShare])
#: Statuses of a service that is restarting or overloaded; the request is retried.
_RETRIED_STATUSES = frozenset({502, 503, 504})

#: Attempts of one request before its connection error or 502, 503 or 504 is
#: raised. The first retry waits the base seconds, and each later wait doubles
#: up to the max: about 30 s in all, enough for the service to restart.
SERVICE_ATTEMPTS = 8
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class MaskingRoundCost:
    """One site's cost of a masking round, beside its masked envelope.

    Byte counts are HTTP bodies. Headers, TLS records and the masked
    envelope itself are not counted.

    Attributes:
        message_bytes_sent: JSON bodies the site sent: its key advertisement,
            share upload and revealed shares.
        message_bytes_received: bodies of the responses that advanced the
            round (roster, relayed shares, reveal request) and of the
            service's acknowledgements. 425 responses to polls are not counted.
        wall_seconds: time from advertising to revealing, waits for the
            other sites included, less any time between ``set_up`` and
            ``finish``.
        compute_seconds: time in the site's own protocol steps: secret
            sharing and share encryption, share decryption, encoding and
            masking, envelope encoding and revealing. Key generation happens
            when the ``MaskingSite`` is built, before the round, and is not
            counted.
    """

    message_bytes_sent: int
    message_bytes_received: int
    wall_seconds: float
    compute_seconds: float


class _CostMeter:
    def __init__(self) -> None:
        self.started: float | None = time.monotonic()
        self.wall = 0.0
        self.sent = 0
        self.received = 0
        self.compute = 0.0

    def pause(self) -> None:
        """Stop counting wall time, while the site trains between phases."""
        if self.started is not None:
            self.wall += time.monotonic() - self.started
            self.started = None

    def resume(self) -> None:
        """Count wall time again from now."""
        if self.started is None:
            self.started = time.monotonic()

    def record(self, response: httpx.Response) -> httpx.Response:
        self.sent += len(response.request.content)
        self.received += len(response.content)
        return response

    @contextmanager
    def computing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.compute += time.perf_counter() - start

    def cost(self) -> MaskingRoundCost:
        running = 0.0 if self.started is None else time.monotonic() - self.started
        return MaskingRoundCost(
            message_bytes_sent=self.sent,
            message_bytes_received=self.received,
            wall_seconds=self.wall + running,
            compute_seconds=self.compute,
        )


@dataclass(frozen=True)
class MaskingSetup:
    """A site's round after ``MaskingClient.set_up``, ready for its update.

    Attributes:
        site: the site's protocol state, with the shares it received.
        deadline: ``time.monotonic()`` by which the round must be done.
        meter: the protocol's cost so far.
    """

    site: MaskingSite
    deadline: float
    meter: "_CostMeter"


class MaskingClient:
    """Calls the masking routes of the aggregation service.

    Args:
        base_url: the service's URL, e.g. ``http://127.0.0.1:8765``.
        timeout: seconds to wait for each request. A held GET gets its
            ``wait`` on top of the read timeout.
        poll_interval: shortest time in seconds between the starts of two
            polls for the same phase.
        wait_per_poll: seconds the service may hold each GET until the round
            reaches its phase (the service caps it, 30 s by default); 0 polls
            without holding.
        http_client: an ``httpx.Client`` to use (for TLS settings); one is
            created when omitted.
        attempts: how many times each request is sent before a connection
            error or a 502, 503 or 504 response is raised; 1 sends it once.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        poll_interval: float = 0.2,
        wait_per_poll: float = 20.0,
        http_client: httpx.Client | None = None,
        attempts: int = SERVICE_ATTEMPTS,
    ) -> None:
        if not 0 <= wait_per_poll < float("inf"):
            raise ConfigError(
                "wait_per_poll must be a finite number of seconds >= 0, got "
                f"{wait_per_poll!r}"
            )
        if attempts < 1:
            raise ConfigError(f"attempts must be at least 1, got {attempts!r}")
        self.attempts = attempts
        self.base_url = base_url.rstrip("/")
        self.poll_interval = poll_interval
        self.wait_per_poll = wait_per_poll
        self._stopped = threading.Event()
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            limits=connection_limits(),
            trust_env=not is_loopback_url(self.base_url),
        )

    def stop(self) -> None:
        """Stop polling. A poll in another thread ends once its request returns."""
        self._stopped.set()

    def close(self) -> None:
        """Stop polling and close the HTTP client, unless the caller passed it in."""
        self._stopped.set()
        if self._owns_http:
            self._http.close()

    def run_round(
        self,
        site: MaskingSite,
        update: Mapping[str, np.ndarray],
        *,
        sample_count: int,
        wait_seconds: float,
        upload: Callable[[bytes], object] | None = None,
        signer: Any = None,
    ) -> MaskingRoundCost:
        """Take part in ``site``'s round from advertising to revealing shares.

        The same as ``set_up`` followed by ``finish``.

        Args:
            site: the site's protocol state, fresh for this round.
            update: the site's update (tensor name to float array).
            sample_count: the site's sample count, its weight in the mean.
            wait_seconds: how long to wait, in total, for the other sites.
            upload: sends the masked envelope, for a service that takes it on
                its own upload route; when None it goes to ``PUT /masked``.
            signer: signs the masked envelope (``key_id`` and
                ``sign(bytes) -> str``, as ``encode_envelope`` takes), or None.

        Returns:
            The bytes and time the protocol cost this site.

        Raises:
            ServiceError: a request failed or the round did not advance in
                time.
            SecureAggregationError: a message from the service failed the
                site's checks; the site then reveals nothing.
        """
        return self.finish(
            self.set_up(site, wait_seconds=wait_seconds),
            update,
            sample_count=sample_count,
            upload=upload,
            signer=signer,
        )

    def set_up(self, site: MaskingSite, *, wait_seconds: float) -> "MaskingSetup":
        """Advertise keys and exchange shares: the phases before the upload.

        None of it depends on the update, so a site can run it while it
        trains, and the round then waits after training only for the upload
        and the reveal. A site that sets up and never calls ``finish`` counts
        as dropped out: the others reveal what the service needs to remove
        its pairwise masks.

        Args:
            site: the site's protocol state, fresh for this round.
            wait_seconds: how long to wait, in total, for the other sites,
                ``finish`` included.

        Raises:
            ServiceError: a request failed or the round did not advance in
                time. A site whose key advertisement the service rejects
                with 409, for example because it is not signed with the key
                the service's site registry lists, withdraws before it raises.
            SecureAggregationError: a message from the service failed the
                site's checks. A site that rejects the roster, for example
                because an advertisement's signature does not verify,
                withdraws before it raises and shares no keys.
        """
        deadline = time.monotonic() + wait_seconds
        meter = _CostMeter()
        prefix = self._prefix(site)
        with meter.computing():
            advertisement = _json(site.advertise())
        try:
            meter.record(self._send("POST", f"{prefix}/keys", json=advertisement))
        except ServiceError as error:
            if error.status_code == _CONFLICT:
                # For example an advertisement not signed with the key the
                # service's site registry lists for the site. Withdrawing
                # lets advertising close without it.
                self._withdraw_after_rejected_advertisement(site, error)
            raise
        roster_response = meter.record(self._poll(f"{prefix}/roster", deadline))
        try:
            with meter.computing():
                roster = parse_message(KeyRoster, roster_response.content)
                share_upload = _json(site.share_keys(roster))
        except SecureAggregationError as error:
            self._withdraw_after_rejected_roster(site, error)
            raise
        meter.record(self._send("POST", f"{prefix}/shares", json=share_upload))
        shares_response = meter.record(
            self._poll(f"{prefix}/shares/{site.site}", deadline)
        )
        with meter.computing():
            site.receive_shares(_SHARE_LIST.validate_json(shares_response.content))
        meter.pause()
        return MaskingSetup(site=site, deadline=deadline, meter=meter)

    def finish(
        self,
        setup: "MaskingSetup",
        update: Mapping[str, np.ndarray],
        *,
        sample_count: int,
        upload: Callable[[bytes], object] | None = None,
        signer: Any = None,
    ) -> MaskingRoundCost:
        """Mask and upload ``update``, then reveal the shares the service requests.

        The same as ``upload_masked`` followed by ``reveal``.

        Args:
            setup: what ``set_up`` returned for this round.
            update, sample_count, upload, signer: as for ``run_round``.

        Returns:
            The bytes and time the whole protocol cost this site. Its wall
            time leaves out the time between ``set_up`` and ``finish``.
        """
        self.upload_masked(
            setup, update, sample_count=sample_count, upload=upload, signer=signer
        )
        return self.reveal(setup)

    def upload_masked(
        self,
        setup: "MaskingSetup",
        update: Mapping[str, np.ndarray],
        *,
        sample_count: int,
        upload: Callable[[bytes], object] | None = None,
        signer: Any = None,
    ) -> None:
        """Mask ``update`` and upload it as an envelope with codec ``masked``.

        Raises:
            SecureAggregationError: the update cannot be encoded (NaN or
                infinite values, or a sample count outside 1 to
                ``max_weight``); nothing is sent.
            ServiceError: the service rejected the upload or is unreachable.
        """
        site, meter = setup.site, setup.meter
        meter.resume()
        prefix = self._prefix(site)
        with meter.computing():
            masked = site.mask_update(update, sample_count=sample_count)
            envelope = encode_envelope(
                masked,
                study=site.context.study,
                round_number=site.context.round_number,
                site=site.site,
                sample_count=sample_count,
                nonce=secrets.token_hex(16),
                codec_name="masked",
                codec_params=site.encoding.codec_params,
                signer=signer,
            )
        if upload is None:
            self._send("PUT", f"{prefix}/masked/{site.site}", content=envelope)
        else:
            # The service takes the same envelope again as a retry.
            self._with_retries(f"upload of site {site.site}", lambda: upload(envelope))

    def reveal(self, setup: "MaskingSetup") -> MaskingRoundCost:
        """Wait for uploads to close, then reveal the shares the service requests.

        Returns:
            The bytes and time the whole protocol cost this site, as for
            ``finish``.
        """
        site, deadline, meter = setup.site, setup.deadline, setup.meter
        prefix = self._prefix(site)
        request = parse_message(
            RevealRequest,
            meter.record(self._poll(f"{prefix}/reveal-request", deadline)).content,
        )
        if site.site not in request.survivors:
            logger.warning(
                "site %s is not a survivor of round %s; it reveals nothing",
                site.site,
                site.context.round_number,
            )
            return meter.cost()
        with meter.computing():
            revealed = _json(site.reveal(request))
        meter.record(self._send("POST", f"{prefix}/reveals", json=revealed))
        logger.info(
            "site %s finished masking round %s", site.site, site.context.round_number
        )
        return meter.cost()

    def withdraw(self, site: MaskingSite) -> None:
        """Tell the service that ``site``, which shared keys, will not upload.

        The service then drops it at once instead of waiting for the round's
        deadline, and the other sites reveal what removes its masks.

        Raises:
            ServiceError: the service rejected the withdrawal or is unreachable.
        """
        self._send("POST", f"{self._prefix(site)}/withdrawals/{site.site}")

    def _withdraw_after_rejected_roster(
        self, site: MaskingSite, error: SecureAggregationError
    ) -> None:
        # The message names sites and the round only, never a key or share.
        logger.warning(
            "site %s rejected the roster of masking round %s and withdraws: %s",
            site.site,
            site.context.round_number,
            error,
        )
        self._withdraw_if_possible(site)

    def _withdraw_after_rejected_advertisement(
        self, site: MaskingSite, error: ServiceError
    ) -> None:
        logger.warning(
            "the aggregation service rejected the key advertisement of site %s in "
            "masking round %s, so the site withdraws: %s",
            site.site,
            site.context.round_number,
            error,
        )
        self._withdraw_if_possible(site)

    def _withdraw_if_possible(self, site: MaskingSite) -> None:
        try:
            self.withdraw(site)
        except ServiceError as withdraw_error:
            # The round then drops the site at its deadline instead.
            logger.warning(
                "site %s could not withdraw from masking round %s: %s",
                site.site,
                site.context.round_number,
                withdraw_error,
            )

    @staticmethod
    def _prefix(site: MaskingSite) -> str:
        study, round_number = site.context.study, site.context.round_number
        return f"/v1/studies/{study}/rounds/{round_number}/secagg"

    def _poll(self, path: str, deadline: float) -> httpx.Response:
        while True:
            started = time.monotonic()
            wait = round(max(0.0, min(self.wait_per_poll, deadline - started)), 3)
            response = self._request(
                "GET",
                path,
                params={"wait": wait} if wait > 0 else None,
                timeout=self._timeout_with(wait),
            )
            if response.status_code != _TOO_EARLY:
                return self._checked(response, "GET", path)
            if self._stopped.is_set():
                raise ServiceError(
                    f"masking round closed by the site while GET {path} waited for its phase"
                )
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"masking round did not advance in time: GET {path} still "
                    f"returns 425 ({_detail(response)})",
                    status_code=_TOO_EARLY,
                )
            # A service that responded at once, because it does not hold
            # requests or the round's deadline passed, is polled every
            # poll_interval.
            time.sleep(max(0.0, started + self.poll_interval - time.monotonic()))

    def _timeout_with(self, wait: float) -> httpx.Timeout:
        timeout = self._http.timeout
        if timeout.read is None:
            return timeout
        return httpx.Timeout(
            connect=timeout.connect,
            read=timeout.read + wait,
            write=timeout.write,
            pool=timeout.pool,
        )

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._checked(self._request(method, path, **kwargs), method, path)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._with_retries(
            f"{method} {path}", lambda: self._request_once(method, path, **kwargs)
        )

    def _with_retries(self, action: str, call: Callable[[], _T]) -> _T:
        """Run ``call`` until it succeeds or fails for good.

        ``call`` raises ``ServiceError``. One without a status (the service
        is unreachable) or with status 502, 503 or 504 is retried, up to
        ``attempts`` calls in all, unless the HTTP client was closed.
        """
        backoff = FIRST_BACKOFF_SECONDS
        attempt = 1
        while True:
            try:
                return call()
            except ServiceError as error:
                transient = (
                    error.status_code is None or error.status_code in _RETRIED_STATUSES
                )
                if not transient or attempt >= self.attempts or self._http.is_closed:
                    raise
                logger.warning(
                    "%s failed (attempt %d of %d): %s; retrying in %.1f s",
                    action,
                    attempt,
                    self.attempts,
                    error,
                    backoff,
                )
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            attempt += 1

    def _request_once(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; raise ``ServiceError`` for a status worth retrying."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ServiceError(
                f"aggregation service at {self.base_url} is unreachable "
                f"({method} {path}): {error}"
            ) from None
        except RuntimeError:
            # httpx raises RuntimeError for a client its owner closed, which a
            # setup thread that outlives its site's round can meet.
            if not self._http.is_closed:
                raise
            raise ServiceError(
                f"cannot send {method} {path}: the site's HTTP client is closed"
            ) from None
        if response.status_code in _RETRIED_STATUSES:
            return self._checked(response, method, path)
        return response

    def _checked(
        self, response: httpx.Response, method: str, path: str
    ) -> httpx.Response:
        if response.status_code >= 400:
            raise ServiceError(
                f"aggregation service rejected {method} {path} with "
                f"{response.status_code}: {_detail(response)}",
                status_code=response.status_code,
            )
        return response


def _json(message: Any) -> Any:
    return message.model_dump(mode="json")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text


class BackgroundMaskingRound:
    """A masking round whose key setup runs in a thread while the site trains.

    The setup phases (``MaskingClient.set_up``) wait for every other site
    twice, and need nothing from the update. Started with the round, they
    overlap local training, so after training the round waits only for the
    upload and the reveal. Call ``close`` when done, also after a failure.
    A site that set up and did not upload (its training failed, or its update
    could not be masked or sent) then withdraws. The service drops it without
    waiting for the round's deadline.

    Args:
        client: the client for the service; ``close`` closes it.
        site: the site's protocol state, fresh for this round.
        wait_seconds: how long to wait, in total, for the other sites.
    """

    def __init__(
        self, client: MaskingClient, site: MaskingSite, *, wait_seconds: float
    ) -> None:
        self._client = client
        self.round_number = site.context.round_number
        self._setup: MaskingSetup | None = None
        self._error: Exception | None = None
        # Guards the hand-over between the setup thread and close: whichever
        # comes second withdraws a site that set up but will not finish.
        self._lock = threading.Lock()
        self._closed = False
        self._set_up_done = False
        # Set once the masked update was sent: from then on the site must not
        # withdraw, because the service counts its upload.
        self._uploaded = False
        # A daemon thread, so that a held poll never keeps the process alive.
        self._thread = threading.Thread(
            target=self._set_up,
            args=(site, wait_seconds),
            name=f"masking-setup-{site.site}",
            daemon=True,
        )
        self._thread.start()

    def _set_up(self, site: MaskingSite, wait_seconds: float) -> None:
        setup = None
        try:
            setup = self._client.set_up(site, wait_seconds=wait_seconds)
        except Exception as error:  # finish raises it in the site's thread
            self._error = error
        with self._lock:
            self._setup = setup
            self._set_up_done = True
            closed = self._closed
        if closed:
            # close came first and left the withdrawal and the client to this
            # thread. A stopped setup may have sent its shares already.
            self._withdraw(site)
            self._client.close()

    def _withdraw(self, site: MaskingSite) -> None:
        try:
            self._client.withdraw(site)
        except ServiceError as error:
            # The round then drops the site at its deadline instead.
            logger.warning(
                "site %s could not withdraw from masking round %s: %s",
                site.site,
                site.context.round_number,
                error,
            )
        else:
            logger.info(
                "site %s withdrew from masking round %s",
                site.site,
                site.context.round_number,
            )

    def finish(
        self,
        update: Mapping[str, np.ndarray],
        *,
        sample_count: int,
        upload: Callable[[bytes], object] | None = None,
        signer: Any = None,
    ) -> MaskingRoundCost:
        """Wait for the setup, then mask, upload and reveal as ``finish`` does.

        Raises:
            The setup's error, if it failed, or ``finish``'s.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._setup is not None
        # An update that cannot be masked or an upload that fails leaves
        # ``_uploaded`` False, so ``close`` withdraws the site.
        self._client.upload_masked(
            self._setup,
            update,
            sample_count=sample_count,
            upload=upload,
            signer=signer,
        )
        self._uploaded = True
        return self._client.reveal(self._setup)

    def close(self) -> None:
        """Withdraw if the site set up but did not upload, then close the client.

        A setup that still runs is stopped at its next poll. Its thread then
        withdraws the site and closes the client.
        """
        with self._lock:
            self._closed = True
            if not self._set_up_done:
                self._client.stop()
                return
            setup = None if self._uploaded else self._setup
        if setup is not None:
            self._withdraw(setup.site)
        self._client.close()
