"""Limits as plain ASGI middleware: the request body's size (413 before the body is parsed or buffered)
and the requests in progress (503 + Retry-After at once when the process is full; how many fit adapts to
the service time, `AdaptiveLimit`)."""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


log = logging.getLogger("retriever.limits")
# True in the task of a request the admission limit refuses: its access-log line is not written.
_SHED = contextvars.ContextVar("shed", default=False)
SHED_SUMMARY_S = 10.0


class _QuietShedding(logging.Filter):
    """Drops uvicorn's access-log line of each refused request. Under overload they were ~10% of a worker's CPU
    (py-spy, 1,200 QPS on 2 cores: 12.4% of its samples in uvicorn's access logging, most for 503s) and
    thousands of identical lines a second; `AdmissionLimit` logs a summary instead, and
    retriever_errors_total{reason="overloaded"} counts each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _SHED.get()


QUIET_SHEDDING = _QuietShedding()


class _TooLarge(Exception):
    pass


async def refuse(
    send: Callable[[Message], Awaitable[None]],
    status: int,
    message: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with `{"error": message}` without reading the request."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Refuses bodies over `max_bytes`: by Content-Length up front, or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_refuse: Callable[[], None] = lambda: None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_refuse = on_refuse

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                await refuse(send, 400, "invalid Content-Length header")
                return
            if too_large:
                self.on_refuse()
                await refuse(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}")
                return
            await self.app(scope, receive, send)  # the server holds a body to its declared length
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                self.on_refuse()
                await refuse(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")


class AdaptiveLimit:
    """How many requests one process admits at once: additive increase, multiplicative decrease on the
    service time (the scheme of Netflix concurrency-limits' AIMDLimit, with TCP's +1 per window of
    completions). A request served within `target_s` raises the limit by 1 / limit; a slower one cuts it by
    `backoff`. It stays between `floor` and `ceiling`; `target_s` 0 keeps it at `ceiling`.

    Why: a fixed limit is either small enough that refusals are quick under overload or large enough that
    bursts at normal load are not refused, not both. At twice the saturating rate on 2 cores (docs/overload.md)
    a fixed 16 answered refusals in 27 ms (p50), a fixed 4 in 4.7 ms but also refused 4% of requests at
    100 QPS; the refusal waits for the same event loop as the admitted requests' work, so fewer admitted
    requests mean faster refusals. Under overload every request is slow and the limit falls to `floor` within
    one window; at normal load they are fast and it climbs back to `ceiling` (from `floor` 4 to 16: ~130
    completions).
    """

    def __init__(self, ceiling: int, floor: int, target_s: float, backoff: float = 0.9):
        self.ceiling = ceiling
        self.floor = max(1, min(floor, ceiling))
        self.target_s = target_s
        self.backoff = backoff
        self._value = float(ceiling)

    @property
    def current(self) -> int:
        return int(self._value)

    @property
    def overloaded(self) -> bool:
        """At half the ceiling or less: requests have been slow for a while (from the ceiling, 7 slow ones in a
        row), not one slow request at normal load."""
        return self.target_s > 0 and self._value <= self.ceiling / 2

    def record(self, service_s: float) -> None:
        if self.target_s <= 0:
            return
        if service_s > self.target_s:
            self._value = max(float(self.floor), self._value * self.backoff)
        else:
            self._value = min(float(self.ceiling), self._value + 1.0 / self._value)


class AdmissionLimit:
    """At most `limit.current` recommendation requests (v1 predict, v2 infer, shop API) at once in this
    process; one more is answered 503 with Retry-After at once instead of waiting in line.

    Without it, fresh `history` requests at 1,200/s (the service completes ~810/s) had p50 249 ms, p99 5.0 s
    and 15% client timeouts: every request queued behind all the others. Health, metrics and admin paths
    are never refused (probes must see an overloaded pod as alive and ready, not dead). A request's service
    time, fed to the limit, runs from its body's last byte to the app's return: a client that uploads slowly
    holds a place but does not lower the limit for everyone else.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: AdaptiveLimit,
        retry_after_s: int,
        on_arrival: Callable[[], None] = lambda: None,
        on_refuse: Callable[[], None] = lambda: None,
        on_limit: Callable[[int], None] = lambda current: None,
        load: AdaptiveLimit | None = None,
    ):
        self.app = app
        self.limit = limit
        # Fed the same service times, with its own target, whatever the admission limit does (fixed or none, as
        # behind the admission sidecar): what says the process is overloaded (RecommendationService.watch_load).
        self.load = load
        self.retry_after = str(retry_after_s).encode()
        self.on_arrival = on_arrival
        self.on_refuse = on_refuse
        self.on_limit = on_limit
        self.in_flight = 0  # one event loop per process: no lock needed
        self.shed_since_summary = 0
        self.summary_at: float | None = None  # when shedding was last logged

    @staticmethod
    def limited(path: str) -> bool:
        return (
            (path.startswith("/v1/models/") and path.endswith(":predict"))
            or (path.startswith("/v2/models/") and path.endswith("/infer"))
            or path.startswith("/shop/api/")
        )

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http" or not self.limited(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        self.on_arrival()
        if self.limit.ceiling <= 0:  # no limit
            started = time.perf_counter()
            try:
                await self.app(scope, receive, send)
            finally:
                if self.load is not None:
                    self.load.record(time.perf_counter() - started)
            return
        if self.in_flight >= self.limit.current:
            self.on_refuse()
            self.summarise_shedding()
            _SHED.set(True)  # this request's own task: its access-log line is dropped (`_QuietShedding`)
            await refuse(
                send,
                503,
                f"overloaded: {self.in_flight} requests in progress (admission limit now {self.limit.current}, "
                f"max_in_flight {self.limit.ceiling}); retry later",
                [(b"retry-after", self.retry_after)],
            )
            return
        received_at = time.perf_counter()

        async def timed_receive() -> Message:
            nonlocal received_at
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                received_at = time.perf_counter()
            return message

        self.in_flight += 1
        try:
            await self.app(scope, timed_receive, send)
        finally:
            self.in_flight -= 1
            before = self.limit.current
            service_s = time.perf_counter() - received_at
            self.limit.record(service_s)
            if self.load is not None:
                self.load.record(service_s)
            if self.limit.current != before:
                self.on_limit(self.limit.current)

    def summarise_shedding(self) -> None:
        """One warning per SHED_SUMMARY_S while refusing, in place of an access-log line per refusal (the
        filter on uvicorn's access logger is added with the first refusal: a process that never refuses keeps
        its access log as uvicorn configured it)."""
        self.shed_since_summary += 1
        now = time.monotonic()
        if self.summary_at is not None and now - self.summary_at < SHED_SUMMARY_S:
            return
        access = logging.getLogger("uvicorn.access")
        if QUIET_SHEDDING not in access.filters:
            access.addFilter(QUIET_SHEDDING)
        if self.summary_at is not None:
            log.warning(
                "overloaded: refused %d requests with 503 in the last %.0f s (%d in progress, admission limit now "
                "%d, max_in_flight %d); their access-log lines are not written",
                self.shed_since_summary,
                now - self.summary_at,
                self.in_flight,
                self.limit.current,
                self.limit.ceiling,
            )
            self.shed_since_summary = 0
        else:  # the first refusal: announced now, counted in the next summary (which starts with it)
            log.warning(
                "overloaded: refusing requests with 503 (%d in progress, admission limit now %d, max_in_flight %d); "
                "a summary every %.0f s replaces their access-log lines",
                self.in_flight,
                self.limit.current,
                self.limit.ceiling,
                SHED_SUMMARY_S,
            )
        self.summary_at = now
