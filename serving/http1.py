"""A minimal keep-alive HTTP/1.1 client on asyncio protocols, for loopback/cluster-local peers.

Both of its users run on the cores they are measured on: the retriever calls Triton once per request
and the load generator sends every request, so each speaks just enough HTTP for its peers (Triton,
KServe/uvicorn): bodies framed by Content-Length, no chunked answers, no redirects, no TLS, one
request in flight per connection. Connections are opened as requests overlap, so concurrent calls
run side by side (unlike a single pipelined stream: benchmarks/LEVERS.md, the two Triton-client rows).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from urllib.parse import urlparse

_STATUS = re.compile(rb"http/1\.[01] (\d{3})")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


@dataclass(frozen=True)
class Response:
    status: int
    head: bytes  # status line and headers, lower-cased
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header `name` (case-insensitive), None when absent."""
        match = re.search(rb"\r\n" + re.escape(name.lower().encode()) + rb":[ \t]*([^\r]*)", self.head)
        return match.group(1).decode("latin-1").strip() if match else None


class _Connection(asyncio.Protocol):
    """One keep-alive connection; a response is complete once Content-Length body bytes are in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head = b""
        self.body_start = -1  # offset of the body of the response being read, once its head is in
        self.response_size = -1
        self.status = 0
        self.reusable = True
        self.waiter: asyncio.Future[Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.response_size < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            status, length = _STATUS.match(head), _CONTENT_LENGTH.search(head)
            if status is None or length is None:
                self.fail(ConnectionError(f"response without a status line or Content-Length: {head[:200]!r}"))
                return
            self.head, self.status = head, int(status.group(1))
            self.reusable = b"connection: close" not in head
            self.body_start = end + 4
            self.response_size = self.body_start + int(length.group(1))
        if len(self.buffer) >= self.response_size:
            response = Response(self.status, self.head, bytes(self.buffer[self.body_start : self.response_size]))
            del self.buffer[: self.response_size]
            self.response_size = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(response)

    def fail(self, error: Exception) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("server closed the connection"))


class KeepAliveClient:
    """Requests to one `http://host:port` over a pool of reused connections (opened on demand, up to `limit`).

    Raises ConnectionError/OSError when the peer cannot be reached or hangs up, TimeoutError after `timeout_s`.
    Create it inside the event loop that will use it (its pool and semaphore belong to that loop).
    """

    def __init__(self, url: str, limit: int = 64, timeout_s: float = 2.0):
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"{url}: only plain http://host:port is supported")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.host_header = f"Host: {parsed.netloc}\r\n"
        self.timeout_s = timeout_s
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(limit)

    async def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> Response:
        """`headers`: extra header lines, each ending in CRLF (Content-Length is added here)."""
        payload = f"{method} {path} HTTP/1.1\r\n{self.host_header}{headers}Content-Length: {len(body)}\r\n\r\n".encode()
        loop = asyncio.get_running_loop()
        async with self.slots:
            connection: _Connection | None = None
            while self.idle and connection is None:  # the peer may have closed an idle one (keep-alive timeout)
                candidate = self.idle.pop()
                if candidate.reusable and candidate.transport is not None and not candidate.transport.is_closing():
                    connection = candidate
            if connection is None:
                _, connection = await asyncio.wait_for(
                    loop.create_connection(_Connection, self.host, self.port), self.timeout_s
                )
            assert connection is not None
            waiter = connection.send(payload + body if body else payload)
            timer = loop.call_later(self.timeout_s, connection.fail, TimeoutError(f"no answer in {self.timeout_s} s"))
            try:
                response = await waiter
            except BaseException as err:  # cancelled too: an answer may still come, so the connection is done
                connection.fail(ConnectionError(f"request abandoned: {err!r}"))
                raise
            finally:
                timer.cancel()
            if connection.reusable:
                self.idle.append(connection)
            elif connection.transport is not None:
                connection.transport.close()
            return response

    def close(self) -> None:
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()
        self.idle.clear()
