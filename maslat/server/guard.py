"""Connection limits of the stand-in server: a cap on open connections, a header deadline, quiet logs.

aiohttp has no header read timeout and no connection cap, so one process could be starved by idle
half-sent requests (slowloris) until accept() fails for lack of file descriptors, and asyncio then logs a
traceback per failed accept. ``ConnectionGuard`` sits between the listening socket and aiohttp's
``RequestHandler`` (a thin protocol wrapper, ``_GuardedProtocol``) and keeps one state per connection::

    accept --> WAITING (headers not complete; deadline header_timeout_s) --headers parsed--> BUSY
                 ^                                                                          |
                 +------------- response done (deadline keepalive_timeout_s) <--------------+
    deadline passed in WAITING --> closed (counted ``timed_out``)

At ``max_connections`` open connections a new one evicts a WAITING connection (it holds no work): the oldest
half-sent request first, then the oldest that has sent nothing for a second, then the oldest keep-alive
connection idle for a second; when there is none the new one is refused (closed at once). A legitimate client therefore always gets in while attackers only
hold idle sockets, and the process never holds more than ``max_connections`` sockets (uvicorn, vLLM's
server, refuses past ``--limit-concurrency`` and closes idle keep-alive connections after 5 s).
Evictions, refusals and timeouts are counted and logged at most once per ``log_interval_s`` (``RateLimitedLog``); so are asyncio's accept errors
(``install_quiet_exception_handler``), so standard error stays small under any flood.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter

__all__ = ["ConnectionGuard", "RateLimitedLog", "fd_room", "quiet_logs"]


def fd_room(reserve: int = 128) -> int | None:
    """File descriptors this process may still open beyond ``reserve`` (``None`` when unknown)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY else max(16, soft - reserve)


_GRACE_S = 1.0  # a silent or idle keep-alive connection is not evicted younger than this


class RateLimitedLog:
    """Count events by kind; write one line per kind and interval to ``stream`` (never one per event)."""

    def __init__(self, interval_s: float = 10.0, stream=None):
        self.interval_s = interval_s
        self.stream = stream
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._last: dict[str, float] = {}

    def event(self, kind: str, message: str, now_s: float) -> None:
        """Record one ``kind`` event; ``message`` (formatted with ``{n}`` = events since the last line)."""
        self.totals[kind] += 1
        self._pending[kind] += 1
        if now_s - self._last.get(kind, -float("inf")) >= self.interval_s:
            self._last[kind] = now_s
            n, self._pending[kind] = self._pending[kind], 0
            print(f"maslat serve: {message.format(n=n)}", file=self.stream or sys.stderr, flush=True)


def install_quiet_exception_handler(loop: asyncio.AbstractEventLoop, log: RateLimitedLog) -> None:
    """Replace the loop's handler so repeated errors (asyncio's "socket.accept() out of system resource",
    a peer reset while closing) become one counted line per interval instead of a traceback each."""

    def handler(loop, context) -> None:
        exc = context.get("exception")
        what = context.get("message", "error")
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else what
        log.event(f"loop:{what}", f"{{n}} x {what} ({detail}) in the last {log.interval_s:g} s", loop.time())

    loop.set_exception_handler(handler)


class _QuietClientErrors(logging.Filter):
    """aiohttp logs a traceback for every malformed HTTP request ("Error handling request", answered 400 by the
    parser); a client's malformed bytes are counted and reported once per interval instead. Errors raised by
    the server's own code pass through untouched."""

    def __init__(self, log: RateLimitedLog):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (HttpProcessingError, ConnectionResetError)):
            return True
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.log.event("bad-http", f"{{n}} malformed HTTP requests answered 400 in the last {self.log.interval_s:g} s "
                       f"(e.g. {type(exc).__name__}: {first[:80]})", time.monotonic())
        return False


def quiet_logs(loop: asyncio.AbstractEventLoop, log: RateLimitedLog):
    """Route the loop's errors and aiohttp's malformed-request tracebacks to ``log`` (one line per kind and
    interval); return the function that removes the logging filter."""
    install_quiet_exception_handler(loop, log)
    logger, flt = logging.getLogger("aiohttp.server"), _QuietClientErrors(log)
    logger.addFilter(flt)
    return lambda: logger.removeFilter(flt)


class _Conn:
    __slots__ = ("transport", "busy", "timer", "since_s", "got_data", "head_done", "tail", "served")

    def __init__(self, transport, now_s: float):
        self.transport, self.busy, self.timer = transport, 0, None
        self.since_s = now_s  # when it entered WAITING
        self.got_data = False  # bytes of the next request arrived
        self.head_done = False  # ... including the blank line that ends its headers (aiohttp parses it now)
        self.tail = b""  # the last bytes seen, to find a blank line split over two reads
        self.served = 0  # requests answered on it (WAITING after one: an idle keep-alive connection)


class ConnectionGuard:
    """Cap, deadlines and counters for the connections of one listening socket (see the module docstring).

    Args:
        max_connections: open connections at most (new ones evict an idle one or are refused).
        header_timeout_s: a new connection must deliver complete request headers within this.
        keepalive_timeout_s: an idle keep-alive connection is closed after this.
        log: where refusals and evictions are counted and reported.
    """

    def __init__(self, *, max_connections: int, header_timeout_s: float, keepalive_timeout_s: float,
                 log: RateLimitedLog):
        self.max_connections = max_connections
        self.header_timeout_s, self.keepalive_timeout_s = header_timeout_s, keepalive_timeout_s
        self.log = log
        self.conns: dict[object, _Conn] = {}  # transport -> state
        self.waiting: dict[object, _Conn] = {}  # transports in WAITING, oldest first
        self.counts: Counter[str] = Counter()
        self.peak = 0

    def factory(self, make_handler):
        """A protocol factory for ``loop.create_server`` wrapping aiohttp's ``make_handler()``."""
        return lambda: _GuardedProtocol(self, make_handler())

    # ------------------------------------------------------------------ called by the protocol
    def admit(self, transport) -> bool:
        now = asyncio.get_running_loop().time()
        if len(self.conns) >= self.max_connections:
            old = self._victim(now)
            if old is None:
                self.counts["refused"] += 1
                self.log.event("refused", f"refused {{n}} connections: {self.max_connections} open, none idle "
                               f"(--max-connections)", now)
                transport.abort()
                return False
            self._drop(old.transport)
            old.transport.abort()
            self.counts["evicted"] += 1
            self.log.event("evicted", f"closed {{n}} idle or half-sent connections to admit new ones "
                           f"({self.max_connections} open; --max-connections)", now)
        c = _Conn(transport, now)
        self.conns[transport] = c
        self.counts["accepted"] += 1
        self.peak = max(self.peak, len(self.conns))
        self._wait(c, self.header_timeout_s)
        return True

    def release(self, transport) -> None:
        self._drop(transport)

    def data_arrived(self, transport, data: bytes) -> None:
        c = self.conns.get(transport)
        if c is not None and not c.head_done:
            c.got_data = True
            c.head_done = b"\r\n\r\n" in c.tail + data[:8192] or b"\r\n\r\n" in data
            c.tail = data[-3:]

    def _victim(self, now_s: float) -> _Conn | None:
        """The WAITING connection to close for a new one, oldest first within each class: a half-sent request
        (bytes but no complete headers: slowloris), then one that has sent nothing for ``_GRACE_S`` (a
        just-accepted connection's bytes may still be unread in the socket), then a keep-alive connection idle
        for ``_GRACE_S`` (a client may be reusing a recently released one right now)."""
        keepalive = silent = None
        for c in self.waiting.values():
            if c.got_data and not c.head_done:
                return c
            if c.got_data:
                continue  # headers complete, its handler about to start: not idle
            if now_s - c.since_s < _GRACE_S:
                continue
            if c.served and keepalive is None:
                keepalive = c
            elif not c.served and silent is None:
                silent = c
        return silent or keepalive

    # ------------------------------------------------------------------ called by the middleware
    def request_started(self, transport) -> None:
        c = self.conns.get(transport)
        if c is not None:
            c.busy += 1
            self._unwait(c)

    def request_done(self, transport) -> None:
        c = self.conns.get(transport)
        if c is not None:
            c.busy -= 1
            c.served += 1
            c.got_data = c.head_done = False
            c.tail = b""
            if c.busy == 0 and not transport.is_closing():
                self._wait(c, self.keepalive_timeout_s)

    # ------------------------------------------------------------------ internals
    def _wait(self, c: _Conn, timeout_s: float) -> None:
        self._unwait(c)
        c.since_s = asyncio.get_running_loop().time()
        self.waiting[c.transport] = c
        c.timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, c)

    def _unwait(self, c: _Conn) -> None:
        self.waiting.pop(c.transport, None)
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None

    def _expire(self, c: _Conn) -> None:
        c.timer = None
        if c.busy == 0 and c.transport in self.conns:
            self.counts["timed_out"] += 1
            self._drop(c.transport)
            c.transport.abort()

    def _drop(self, transport) -> None:
        c = self.conns.pop(transport, None)
        if c is not None:
            self._unwait(c)

    @property
    def open_connections(self) -> int:
        return len(self.conns)


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every protocol call to aiohttp's ``RequestHandler`` unless the guard refused the connection."""

    __slots__ = ("guard", "inner", "admitted", "transport")

    def __init__(self, guard: ConnectionGuard, inner):
        self.guard, self.inner, self.admitted, self.transport = guard, inner, False, None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.admitted = self.guard.admit(transport)
        if self.admitted:
            self.inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        if self.admitted:
            self.guard.release(self.transport)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.guard.data_arrived(self.transport, data)
            self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()
