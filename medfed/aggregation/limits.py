"""Request limits of the aggregation service: body size, rate, concurrency.

- ``BodySizeLimitMiddleware`` rejects with 413 a request whose
  ``Content-Length`` exceeds the limit before reading any of its body. It
  rejects a streamed (chunked) body as soon as it grows past the limit, so
  the service never buffers more than the limit.
- ``RateLimitMiddleware`` keeps one token bucket per site (the site of the
  client certificate, or the client address without one) and rejects with
  429 and ``Retry-After`` when a bucket is empty.
- The number of concurrent connections and tasks is capped by uvicorn's
  ``limit_concurrency``, which responds with 503 beyond it
  (``uvicorn_limit_options``).
- On SIGTERM or Ctrl-C uvicorn stops accepting connections and lets the
  open requests finish for at most ``SHUTDOWN_GRACE_SECONDS``, then cancels
  them. Without that bound a held masking poll (up to 30 s) keeps a stopping
  service alive. A site whose request is cancelled sees the connection
  close and reports the service as unreachable.

Both middlewares are pure ASGI, so they run before FastAPI routes and
dependencies see the request.
"""

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medfed.aggregation.tls import peer_identity
from medfed.errors import ConfigError

__all__ = [
    "KEEP_ALIVE_SECONDS",
    "SHUTDOWN_GRACE_SECONDS",
    "BodySizeLimitMiddleware",
    "RateLimitMiddleware",
    "ServiceLimits",
    "TokenBucket",
    "install_limits",
    "uvicorn_limit_options",
]

logger = logging.getLogger(__name__)

_EXEMPT_PATHS = frozenset({"/health"})


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """Limits on what one client may ask of the service.

    Attributes:
        max_body_bytes: largest request body accepted, in bytes. The default
            fits the envelope decoder's defaults (64 MiB payload plus a
            256 KiB header) with 1 MiB to spare.
        rate_per_second: sustained requests per second per site.
        rate_burst: requests a site may make at once after being idle.
        max_concurrency: concurrent connections plus tasks before uvicorn
            responds with 503.
        max_tracked_clients: token buckets kept in memory; the least
            recently used bucket is dropped beyond it.
    """

    max_body_bytes: int = 65 * 1024 * 1024 + 256 * 1024
    rate_per_second: float = 20.0
    rate_burst: int = 50
    max_concurrency: int = 256
    max_tracked_clients: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "rate_burst", "max_concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"service limit {name} must be a positive integer, got {value!r}"
                )
        if (
            not isinstance(self.max_tracked_clients, int)
            or self.max_tracked_clients < 1
        ):
            raise ConfigError(
                "service limit max_tracked_clients must be a positive integer, "
                f"got {self.max_tracked_clients!r}"
            )
        rate = self.rate_per_second
        if not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
            raise ConfigError(
                f"service limit rate_per_second must be a positive number, got {rate!r}"
            )


#: Seconds a stopping service gives its open requests before it cancels them.
SHUTDOWN_GRACE_SECONDS = 5
#: Seconds the service keeps an idle keep-alive connection open. Clients drop
#: idle connections sooner (``medfed.sites.client.KEEPALIVE_EXPIRY_SECONDS``).
KEEP_ALIVE_SECONDS = 5


def uvicorn_limit_options(limits: ServiceLimits) -> dict[str, Any]:
    """Return ``uvicorn.Config`` keyword arguments that enforce ``limits``.

    They also bound a graceful shutdown to ``SHUTDOWN_GRACE_SECONDS``.
    """
    return {
        "limit_concurrency": limits.max_concurrency,
        "timeout_graceful_shutdown": SHUTDOWN_GRACE_SECONDS,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
    }


def install_limits(
    app: FastAPI, limits: ServiceLimits, *, rate_limit: bool = True
) -> None:
    """Add the body-size and, unless ``rate_limit`` is False, rate-limit middlewares.

    The body-size check is added last, so it runs first: an oversized
    request is rejected before it costs a rate-limit token.
    """
    if rate_limit:
        app.add_middleware(RateLimitMiddleware, limits=limits)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=limits.max_body_bytes)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Rejects request bodies larger than ``max_body_bytes`` with 413."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.rejections = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await _send_error(send, 400, "invalid Content-Length header")
            return
        if declared is not None and declared > self.max_body_bytes:
            self._log(scope, f"Content-Length {declared}")
            await _send_error(send, 413, self._message(declared))
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            self._log(scope, f"more than {received} streamed bytes")
            if not response_started:
                await _send_error(send, 413, self._message(None))

    def _message(self, declared: int | None) -> str:
        size = f" of {declared} bytes" if declared is not None else ""
        return f"request body{size} exceeds the limit of {self.max_body_bytes} bytes"

    def _log(self, scope: Scope, size: str) -> None:
        # Count every rejection but log only the first and each 100th, so a
        # flood of oversized requests cannot flood the log.
        self.rejections += 1
        if self.rejections == 1 or self.rejections % 100 == 0:
            logger.warning(
                "rejected request body (%s) on %r from %s; %d rejections so far",
                size,
                scope.get("path", "")[:200],
                (scope.get("client") or ("unknown",))[0],
                self.rejections,
            )


class TokenBucket:
    """A token bucket: ``capacity`` tokens, refilled at ``rate`` per second."""

    def __init__(
        self, *, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = float(capacity)
        self.updated = clock()

    def take(self) -> float:
        """Take one token; return 0 on success, else seconds until one is free."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimitMiddleware:
    """Rejects a site's requests beyond its token bucket with 429."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: ServiceLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.limits = limits
        self.clock = clock
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.rejections = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        client = _client_key(scope)
        wait = self._bucket(client).take()
        if wait > 0:
            self.rejections += 1
            if self.rejections == 1 or self.rejections % 100 == 0:
                logger.warning(
                    "rate limit reached for %s; %d requests rejected so far",
                    client,
                    self.rejections,
                )
            await _send_error(
                send,
                429,
                f"rate limit of {self.limits.rate_per_second:g} requests per second "
                f"exceeded for {client}; retry in {max(wait, 0.1):.1f} s",
                headers=[(b"retry-after", str(math.ceil(wait)).encode())],
            )
            return
        await self.app(scope, receive, send)

    def _bucket(self, client: str) -> TokenBucket:
        bucket = self.buckets.get(client)
        if bucket is None:
            bucket = TokenBucket(
                rate=self.limits.rate_per_second,
                capacity=self.limits.rate_burst,
                clock=self.clock,
            )
            self.buckets[client] = bucket
            if len(self.buckets) > self.limits.max_tracked_clients:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(client)
        return bucket


def _client_key(scope: Scope) -> str:
    try:
        identity = peer_identity(scope)
    except HTTPException:
        identity = None
    if identity is not None:
        return f"{identity.role} {identity.name}"
    client = scope.get("client")
    return f"address {client[0]}" if client else "address unknown"


def _content_length(scope: Scope) -> int | None:
    """Return the declared body length, None when absent, -1 when invalid."""
    values = [value for name, value in scope["headers"] if name == b"content-length"]
    if not values:
        return None
    if len(values) > 1 or not values[0].isdigit() or len(values[0]) > 20:
        return -1
    return int(values[0])


async def _send_error(
    send: Send,
    status: int,
    detail: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
